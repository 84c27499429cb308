"""The three compute phases of one RL step: score, make experience, train.

Shapes follow experience.Batch: [B, R] per response token, [B] per sample, where B is this
rank's samples (its prompts x n) and R the longest response.
"""
from __future__ import annotations

import torch

from hpc_rlhf.algos.advantages import compute_advantages
from hpc_rlhf.algos.filtering import overlong_penalty
from hpc_rlhf.algos.kl import kl_estimate
from hpc_rlhf.algos.losses import aggregate_loss, policy_loss, value_loss
from hpc_rlhf.algos.masked import masked_mean
from hpc_rlhf.config import JobConfig, Sizes
from hpc_rlhf.engine.deepspeed_strategy import compute_precision
from hpc_rlhf.engine.logprobs import (entropy_from_logits, logprobs_and_entropy,
                                      logprobs_from_logits, response_logits)
from hpc_rlhf.engine.moe import attach_router_aux_loss
from hpc_rlhf.engine.ring_common import scaled
from hpc_rlhf.engine.ring_rl import (gather_ring_batch, ring_response_logprobs,
                                     ring_response_values, rl_ring)
from hpc_rlhf.models.heads import response_values
from hpc_rlhf.recipes.rl.experience import Batch, distributed_whiten, with_fields
from hpc_rlhf.recipes.rl.micro import forward_groups, train_steps
from hpc_rlhf.recipes.rl.shared_prompt import (packed_tokens, shared_logprobs,
                                                shared_response_logits)

WHITENED = ("gae", "reinforce", "reinforce_baseline")  # as OpenRLHF: not grpo/dr_grpo/rloo


def score_rollouts(cfg: JobConfig, reward_source, tok, prompts, episodes
                   ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(rewards [B], filter scores [B], reward metrics) of `episodes` (collect.Episode or
    rollout.Rollout, prompt-major, n per prompt; prompt_index into `prompts`).

    Filter scores are what dynamic filtering compares within a group: the reward function's or
    server's "scores" when it returns them (OpenRLHF's convention), else the rewards. Reward
    metrics are the batch means of its "extra_logs" as reward_extra/<name> (a namespace of
    their own: a name like "mean" cannot overwrite reward/mean). Agent episodes bring their own
    reward."""
    from hpc_rlhf.rewards.base import reward_batch
    rewards_given = [getattr(e, "reward", None) for e in episodes]
    scores, logs = None, {}
    if all(r is not None for r in rewards_given) and episodes:
        rewards = torch.tensor(rewards_given, dtype=torch.float32)
    else:
        owners = [prompts[e.prompt_index] for e in episodes]
        batch = reward_batch(tok, [p.ids for p in owners], [e.response_ids for e in episodes],
                             [p.text for p in owners], [p.label for p in owners])
        rewards = reward_source.score(batch).float().reshape(-1)
        scores = getattr(reward_source, "last_scores", None)
        logs = {f"reward_extra/{k}": v
                for k, v in (getattr(reward_source, "last_logs", None) or {}).items()}
    a = cfg.algorithm
    if a.overlong_buffer:
        lengths = torch.tensor([len(e.response_ids) for e in episodes])
        rewards = rewards + overlong_penalty(lengths, cfg.rollout.max_new_tokens,
                                             a.overlong_buffer, a.overlong_penalty)
    return rewards, rewards if scores is None else scores.float().reshape(-1), logs


def sample_records(tok, prompts, episodes, rewards: torch.Tensor, k: int) -> list[dict]:
    """The first `k` samples as scored (logging.samples_per_step -> samples.jsonl): "prompt",
    the prompt as the model saw it (chat template applied, special tokens kept), "message" the
    dataset's prompt text, the label, the decoded response and its reward."""
    out = []
    for e, r in list(zip(episodes, rewards.tolist()))[:k]:
        p = prompts[e.prompt_index]
        out.append({"prompt": tok.decode(p.ids, skip_special_tokens=False), "message": p.text,
                    "label": p.label,
                    "response": tok.decode(e.response_ids, skip_special_tokens=True),
                    "reward": float(r)})
    return out


def _forward_rows(fn, batch: Batch, micro: int, max_tokens: int = 0, group: int = 1,
                  max_response_tokens: int = 0) -> torch.Tensor:
    """Run fn(micro_batch) -> [b, r] over the batch's micro-batches (fixed size, or by token
    budget: rl/micro.py); reassemble as [B, R]."""
    out = torch.zeros(batch.action_mask.shape, dtype=torch.float32)
    for idx in forward_groups(batch, micro, max_tokens, group, max_response_tokens):
        mb = batch.rows(idx)
        out[idx, :mb.response_len] = fn(mb).float()
    return out


def _logits(engine, mb: Batch, shared: bool) -> torch.Tensor:
    """[b, r, v] logits predicting the response columns: padded rows, or one row per prompt
    group (train.shared_prompt, rl/shared_prompt.py)."""
    if shared:
        return shared_response_logits(engine, mb)
    return response_logits(engine, mb.input_ids, mb.attention_mask, mb.response_len)


def _logprobs(engine, mb: Batch, temperature: float, ring=None, shared: bool = False
              ) -> torch.Tensor:
    with compute_precision(engine):
        return _logprobs_of(engine, mb, temperature, ring, shared)


def _logprobs_of(engine, mb: Batch, temperature: float, ring, shared: bool) -> torch.Tensor:
    if ring is not None:  # train.ring_attn_size > 1: the sequence split over the ring
        return ring_response_logprobs(engine, mb.input_ids, mb.attention_mask, mb.response_len,
                                      ring, temperature)
    if shared:
        return shared_logprobs(engine, mb, temperature, with_entropy=False)[0]
    return logprobs_from_logits(_logits(engine, mb, shared), mb.input_ids[:, -mb.response_len:],
                                temperature)


def _policy_forward(engine, mb: Batch, temperature: float, ring, entropy_grad: bool,
                    shared: bool = False):
    """(logprobs [b, r] with grad, entropy [b, r]: with grad only if entropy_grad)."""
    with compute_precision(engine):
        return _policy_forward_of(engine, mb, temperature, ring, entropy_grad, shared)


def _policy_forward_of(engine, mb: Batch, temperature: float, ring, entropy_grad: bool,
                       shared: bool):
    if ring is not None:
        return ring_response_logprobs(engine, mb.input_ids, mb.attention_mask, mb.response_len,
                                      ring, temperature,
                                      entropy="grad" if entropy_grad else "detached")
    if shared and not entropy_grad:  # one packed row per prompt group, fused logprobs
        return shared_logprobs(engine, mb, temperature)
    logits = _logits(engine, mb, shared)                                         # [b,r,v]
    labels = mb.input_ids[:, -mb.response_len:]
    if entropy_grad:
        return (logprobs_from_logits(logits, labels, temperature),
                entropy_from_logits(logits, temperature))
    return logprobs_and_entropy(logits, labels, temperature)  # one fused pass


def _values(critic, mb: Batch, ring=None) -> torch.Tensor:
    # V(state before each response token), aligned with the logprobs: [b, r], float32.
    with compute_precision(critic):
        if ring is not None:
            return ring_response_values(critic, mb.input_ids, mb.attention_mask,
                                        mb.response_len, ring).float()
        return response_values(critic, mb.input_ids, mb.attention_mask, mb.response_len).float()


def needs_old_logprobs(cfg: JobConfig, s: Sizes) -> bool:
    """A separate no-grad pass for old logprobs is needed only if the policy changes before
    some micro-batch is trained (several optimizer steps or epochs) or for KL in the reward;
    otherwise the training forward's own logprobs, detached, are exactly the old ones."""
    return s.optimizer_steps_per_step > 1 or cfg.algorithm.kl_in_reward


@torch.no_grad()
def make_experience(cfg: JobConfig, s: Sizes, models, batch: Batch, kl_coef: float):
    a, temp = cfg.algorithm, cfg.rollout.temperature
    shared = s.shared_prompt  # train.shared_prompt and max_tokens_per_micro_batch as they run
    micro = (cfg.train.micro_batch_size, s.micro_tokens,
             cfg.rollout.n_samples_per_prompt if shared else 1, s.micro_response_tokens)
    metrics = {}
    ring = rl_ring(cfg, models)  # None unless train.ring_attn_size > 1
    batch = gather_ring_batch(batch, ring)  # a ring's members train on all their rows
    old = ref = values = kl = None
    if needs_old_logprobs(cfg, s):
        old = _forward_rows(lambda mb: _logprobs(models.actor, mb, temp, ring, shared), batch,
                            *micro)
    if models.ref is not None:
        ref = _forward_rows(lambda mb: _logprobs(models.ref, mb, temp, ring, shared), batch,
                            *micro)
        current = old if old is not None else batch.rollout_logp
        kl = kl_estimate(current, ref, a.kl_estimator)
        metrics["kl/mean"] = masked_mean(kl, batch.action_mask).item()
    if models.critic is not None:
        values = _forward_rows(lambda mb: _values(models.critic, mb, ring), batch, *micro)
    estimator = "gae" if a.name == "ppo" else a.name
    adv, ret = compute_advantages(
        estimator, batch.rewards, batch.action_mask,
        n_samples_per_prompt=cfg.rollout.n_samples_per_prompt, values=values,
        kl=kl if a.kl_in_reward else None, kl_coef=kl_coef if a.kl_in_reward else 0.0,
        gamma=a.gamma, lam=a.lam, normalize=False, reward_clip=(-a.reward_clip, a.reward_clip),
        clip_after_baseline=a.reward_clip_stage == "shaped")
    if estimator in WHITENED:
        adv = distributed_whiten(adv, batch.action_mask)
    metrics["advantage/abs_mean"] = masked_mean(adv.abs(), batch.action_mask).item()
    return with_fields(batch, old_logp=old, ref_logp=ref, values=values, advantages=adv,
                       returns=ret), metrics


def train_on_batch(cfg: JobConfig, s: Sizes, strategy, models, batch: Batch, kl_coef: float,
                   step: int) -> dict:
    """Epochs x optimizer steps x micro-batches of the policy (and critic) losses
    (rl/micro.py: fixed micro-batches, or dynamic ones under a token budget (s.micro_tokens,
    from train.max_tokens_per_micro_batch) with their loss shares). Returns metrics averaged
    over micro-batches."""
    t = cfg.train
    gen = torch.Generator().manual_seed(t.seed * 7_919 + step)
    opt_steps = [micros for _ in range(t.epochs_per_step)
                 for micros in train_steps(batch, micro_batch_size=t.micro_batch_size,
                                           grad_accum=s.grad_accum,
                                           max_tokens=s.micro_tokens,
                                           max_response_tokens=s.micro_response_tokens,
                                           loss_agg=cfg.algorithm.loss_agg, generator=gen,
                                           group=(cfg.rollout.n_samples_per_prompt
                                                  if s.shared_prompt else 1),
                                           step_shares=cfg.algorithm.token_mean_scope == "step")]
    ctx = _TrainContext(cfg, strategy, models, kl_coef, s.shared_prompt)
    sums: dict[str, float] = {}
    count, run_tokens = 0, 0
    for k, micros in enumerate(opt_steps):
        for micro in micros:
            run_tokens += (packed_tokens(micro.batch) if s.shared_prompt
                           else int(micro.batch.attention_mask.sum()))
            m = ctx.train_micro(micro, first_update=k == 0)
            for key, v in m.items():
                sums[key] = sums.get(key, 0.0) + v
            count += 1
    out = {key: v / count for key, v in sums.items()}
    if "rollout/logprob_gap_mean" in sums:  # averaged over the first optimizer step only
        out["rollout/logprob_gap_mean"] = sums["rollout/logprob_gap_mean"] / len(opt_steps[0])
    out["train/micro_batches"] = float(count)  # forward/backward passes of the actor
    # real (unpadded) prompt + response tokens trained on per epoch, what a padded trainer
    # runs too, and those the training forwards ran (each shared prompt once, all epochs):
    # benchmarks/grpo_step.py turns them into FLOP/s
    out["train/tokens"] = float(batch.attention_mask.sum())
    out["train/forward_tokens"] = float(run_tokens)
    out["train/lr"] = models.actor.get_lr()[0] if hasattr(models.actor, "get_lr") else t.actor_lr
    return out


class _TrainContext:
    """What every micro-batch of one train_on_batch call shares."""

    def __init__(self, cfg: JobConfig, strategy, models, kl_coef: float, shared: bool):
        self.cfg, self.strategy, self.models, self.kl_coef = cfg, strategy, models, kl_coef
        self.shared = shared  # shared-prompt forwards (config/rules.shared_prompt)
        a = cfg.algorithm
        self.kl_in_loss = models.ref is not None and not a.kl_in_reward and kl_coef > 0
        # MoE router balance (0 = off)
        self.aux = attach_router_aux_loss(models.actor, cfg.train.aux_loss_coef)
        self.ring = rl_ring(cfg, models)  # None unless train.ring_attn_size > 1 (loss x ring)

    def train_micro(self, micro, first_update: bool) -> dict:
        """Forward, losses and backward of one micro-batch (the optimizer steps at its
        step's boundary); returns its metrics."""
        cfg, a, models, ring = self.cfg, self.cfg.algorithm, self.models, self.ring
        mb, max_len = micro.batch, cfg.rollout.max_new_tokens
        logp, ent = _policy_forward(models.actor, mb, cfg.rollout.temperature, ring,
                                    bool(a.entropy_coef), self.shared)
        old = mb.old_logp if mb.old_logp is not None else logp.detach()
        loss, pm = policy_loss(
            logp, old, mb.advantages, mb.action_mask, clip_eps_low=a.clip_eps_low,
            clip_eps_high=a.clip_eps_high, dual_clip=a.dual_clip or None,
            loss_agg=a.loss_agg, importance=a.importance_level,
            rollout_logp=mb.rollout_logp if a.off_policy != "none" else None,
            tis_cap=a.tis_cap if a.off_policy == "tis" else None, tis_floor=a.tis_floor,
            icepop=(a.icepop_low, a.icepop_high) if a.off_policy == "icepop" else None,
            max_len=max_len)
        m = {f"policy/{key}": float(v) for key, v in pm.items()}
        m["loss/policy"] = loss.item()
        if self.kl_in_loss:
            kl = kl_estimate(logp, mb.ref_logp, a.kl_estimator)
            kl_loss = aggregate_loss(kl, mb.action_mask, a.loss_agg, max_len)
            loss = loss + self.kl_coef * kl_loss
            m["loss/kl"] = kl_loss.item()
        if a.entropy_coef:
            ent_loss = aggregate_loss(ent, mb.action_mask, a.loss_agg, max_len)
            loss = loss - a.entropy_coef * ent_loss
            m["policy/entropy"] = ent_loss.item()
        else:
            m["policy/entropy"] = masked_mean(ent, mb.action_mask).item()
        if first_update:  # before the first update: engine vs trainer
            gap = (logp.detach() - mb.rollout_logp).abs()
            m["rollout/logprob_gap_mean"] = masked_mean(gap, mb.action_mask).item()
        loss = self.aux.add_to(loss, m, "loss/moe_aux")  # + coef x aux of this actor forward
        self._backward_step(scaled(loss, ring), models.actor, micro)
        if models.critic is not None:
            v = _values(models.critic, mb, ring)
            vloss, vm = value_loss(v, mb.values, mb.returns, mb.action_mask,
                                   clip_eps=a.value_clip, loss_agg=a.loss_agg, max_len=max_len)
            self._backward_step(scaled(vloss, ring), models.critic, micro)
            m["loss/value"] = vloss.item()
            m.update({f"critic/{key}": float(x) for key, x in vm.items()})
        return m

    def _backward_step(self, loss, engine, micro) -> None:
        self.strategy.backward(loss, engine, weight=micro.weight, boundary=micro.boundary)
        self.strategy.step(engine)
