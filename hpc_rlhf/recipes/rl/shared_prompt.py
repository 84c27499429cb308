"""Shared-prompt forwards (train.shared_prompt): the n samples of a GRPO-style group share one
prompt, so run that prompt once per group instead of n times.

A micro-batch's consecutive rows with identical prompts form a run; each run becomes one row

    tokens    prompt | response_1 | response_2 | ... | response_n
    positions 0..P-1 | P..P+L1-1 | P..P+L2-1  | ... (each response continues the prompt)
    attention prompt: causal; response j: the whole prompt + its own earlier tokens

(a 4-D additive mask: HF models take it as given). Every hidden state then equals the one of
the sample's own padded row (causal attention sees the same tokens at the same positions),
and since the loss is a sum over samples the gradient of the shared prompt positions is the sum
of the per-sample ones: logprobs, entropies and gradients equal the padded forward's (tested),
with about P * (n - 1) fewer tokens per group (GRPO on SmolLM2: 8 x 58 -> 226 tokens).
Response j's first token is predicted at the last prompt position (shared by the run).
Rows are padded to the longest; padding attends to itself only. Runs of one sample work too.
"""
from __future__ import annotations

import torch

from hpc_rlhf.engine.deepspeed_strategy import begin_forward
from hpc_rlhf.recipes.rl.experience import Batch
from hpc_rlhf.recipes.rl.micro import real_lengths


def prompt_runs(batch: Batch) -> list[tuple[int, int]]:
    """[start, end) row ranges of consecutive rows whose prompts are identical."""
    R = batch.response_len
    ids = batch.input_ids[:, :batch.input_ids.shape[1] - R]
    mask = batch.attention_mask[:, :ids.shape[1]].bool()
    runs, start = [], 0
    for i in range(1, batch.size + 1):
        if i == batch.size or not (torch.equal(mask[i], mask[start])
                                   and torch.equal(ids[i][mask[i]], ids[start][mask[start]])):
            runs.append((start, i))
            start = i
    return runs


def packed_tokens(batch: Batch) -> int:
    """Real tokens of `batch`'s packed rows (padding excluded): each run's prompt once, plus
    every response."""
    prompt, response = real_lengths(batch)
    return int(response.sum()) + sum(int(prompt[a]) for a, _ in prompt_runs(batch))


def shared_layout(batch: Batch):
    """The packed rows of `batch` (see the module doc).

    Returns (input_ids [G, T], position_ids [G, T], mask4d [G, 1, T, T] bool (True = may
    attend), pred [B, R] long (the flat position g * T + t that predicts each response column),
    valid [B, R] bool)."""
    R = batch.response_len
    P_all = batch.input_ids.shape[1] - R
    runs = prompt_runs(batch)
    rows, spans = [], []   # spans: per sample (row g, start of its response, its length)
    prompt_lens = []
    for start, end in runs:
        pmask = batch.attention_mask[start, :P_all].bool()
        prompt = batch.input_ids[start, :P_all][pmask]
        parts, pos = [prompt], [torch.arange(prompt.numel())]
        offset = prompt.numel()
        for i in range(start, end):
            L = int(batch.attention_mask[i, P_all:].sum())
            parts.append(batch.input_ids[i, P_all:P_all + L])
            pos.append(torch.arange(prompt.numel(), prompt.numel() + L))
            spans.append((len(rows), offset, L))
            offset += L
        rows.append((torch.cat(parts), torch.cat(pos),
                     [(s, L) for _, s, L in spans[start:end]]))  # spans[i] is sample i's
        prompt_lens.append(prompt.numel())
    G, T = len(rows), max(r[0].numel() for r in rows)
    input_ids = torch.zeros((G, T), dtype=torch.long)
    position_ids = torch.zeros((G, T), dtype=torch.long)
    mask = torch.zeros((G, T, T), dtype=torch.bool)
    causal = torch.ones((T, T), dtype=torch.bool).tril()
    for g, (ids, pos, resp) in enumerate(rows):
        n, P = ids.numel(), prompt_lens[g]
        input_ids[g, :n], position_ids[g, :n] = ids, pos
        mask[g, :P, :P] = causal[:P, :P]
        for s, L in resp:
            mask[g, s:s + L, :P] = True
            mask[g, s:s + L, s:s + L] = causal[:L, :L]
        idx = torch.arange(n, T)
        mask[g, idx, idx] = True          # padding attends to itself (no empty softmax row)
    # the position predicting response column j of sample i: j == 0 -> last prompt position
    pred = torch.zeros((batch.size, R), dtype=torch.long)
    valid = torch.zeros((batch.size, R), dtype=torch.bool)
    row_of = torch.zeros(batch.size, dtype=torch.long)
    for i, (g, s, L) in enumerate(spans):
        if L:
            pred[i, 0] = prompt_lens[g] - 1
            pred[i, 1:L] = torch.arange(s, s + L - 1)
            valid[i, :L] = True
        row_of[i] = g
    pred = torch.where(valid, row_of[:, None] * T + pred, torch.zeros_like(pred))
    return input_ids, position_ids, mask[:, None], pred, valid


_SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _decoder_and_head(model):
    """(decoder trunk, output embedding) of an HF causal LM inside a DeepSpeed engine and/or a
    peft wrapper; None when the model changes its logits after the head (soft-capping,
    scaling), which only its own forward applies."""
    m = getattr(model, "module", model)
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    config = getattr(m, "config", None)
    if any(getattr(config, k, None) not in (None, 1, 1.0) for k in _SCALED_LOGITS):
        return None
    try:
        return m.get_decoder(), m.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def _packed_logits(model, batch: Batch):
    """(logits [K, V] of the K distinct predicting positions, index [B, R] into them, valid
    [B, R]) of one packed forward. The trunk runs on the packed rows and the output head only
    on those K positions (the model's own forward, with `logits_to_keep` = the union of the
    positions over rows, when the head cannot be called alone)."""
    input_ids, position_ids, mask, pred, valid = shared_layout(batch)
    G, T = input_ids.shape
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    additive = torch.zeros(mask.shape, dtype=dtype)
    additive.masked_fill_(~mask, torch.finfo(dtype).min)
    need = torch.unique(pred[valid]) if valid.any() else torch.zeros(1, dtype=torch.long)
    kwargs = dict(input_ids=input_ids.to(device), attention_mask=additive.to(device),
                  position_ids=position_ids.to(device), use_cache=False)
    parts = _decoder_and_head(model)
    if parts is not None:
        decoder, head = parts
        begin_forward(model)  # what engine(...) does first: ZeRO's micro-step bookkeeping
        out = decoder(**kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        logits = head(hidden.reshape(G * T, -1)[need.to(device)])        # [K, V]
        index = torch.searchsorted(need, pred)
    else:
        keep = torch.unique(need % T)
        out = model(**kwargs, logits_to_keep=keep.to(device))
        logits = (out.logits if hasattr(out, "logits") else out[0]).reshape(-1, out.logits.shape[-1])
        slot = torch.full((T,), 0, dtype=torch.long)
        slot[keep] = torch.arange(keep.numel())
        index = (pred // T) * keep.numel() + slot[pred % T]
    index = torch.where(valid, index.clamp(max=logits.shape[0] - 1), torch.zeros_like(index))
    return logits, index.to(device), valid.to(device)


def shared_response_logits(model, batch: Batch) -> torch.Tensor:
    """Logits predicting each response column, [B, R, V], from one packed forward (see the
    module doc); columns beyond a response hold an arbitrary real position's logits. Gathers a
    [B, R, V] copy (its backward scatters it back): `shared_logprobs` avoids both."""
    flat, index, _ = _packed_logits(model, batch)
    return flat[index]


def shared_logprobs(model, batch: Batch, temperature: float = 1.0, with_entropy: bool = True):
    """(log p of each response token [B, R] with gradient, entropy [B, R] without), 0 beyond
    each response, from one packed forward; the fused kernel reads each kept position once.
    with_entropy=False: (log p, None), the entropy not computed."""
    from hpc_rlhf.engine.logprobs import logprobs_and_entropy_at
    flat, index, valid = _packed_logits(model, batch)
    labels = batch.input_ids[:, -batch.response_len:].to(flat.device)
    lp, ent = logprobs_and_entropy_at(flat, index[valid], labels[valid], temperature,
                                      with_entropy=with_entropy)
    zeros = torch.zeros(valid.shape, dtype=torch.float32, device=flat.device)
    return (zeros.masked_scatter(valid, lp),
            zeros.masked_scatter(valid, ent) if with_entropy else None)
