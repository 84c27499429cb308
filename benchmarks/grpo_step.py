"""GRPO step time: hpc_rlhf vs TRL's GRPOTrainer, same model, prompts, batch and lengths, same run.

    python benchmarks/grpo_step.py                         # tiny Llama, 8 prompts x 8, 8 tokens
    python benchmarks/grpo_step.py --steps 12 --engine hf --rounds 2

Both sides run in their own subprocess, one after the other (alternating for --rounds > 1, so a
load change on a shared machine hits both): ours is `python -m hpc_rlhf.launch.main` on
configs/grpo_tiny.yaml (colocated, 1 process, DeepSpeed ZeRO-3, vLLM or HF rollout); TRL's is
GRPOTrainer on the same tiny model (plain torch on CPU, `model.generate` rollout: vLLM colocate
mode in TRL needs CUDA). Shared settings: the same chat-templated `repeat` prompts and reward,
n samples per prompt, max new tokens, temperature 1, precision (--dtype: fp32 on both sides, or
bf16 on both: our DeepSpeed bf16 with fp32 master weights and bf16 vLLM, TRL's bf16 autocast;
CPUs with AVX512-BF16/AMX run bf16 matmuls ~4x faster), one optimizer step per RL step over
micro-batches of `--micro`, AdamW (0.9, 0.95), lr, grad clip 1, no KL/reference model, the
same HF attention kernel (--attn) for the trained model. Ours runs with the project's defaults
for the rest, as a user would: dynamic micro-batches (train.max_tokens_per_micro_batch=-1: a
token budget derived from --micro and the lengths; length-sorted micro-batches, each loss
weighted by its share, so the step's gradient is the same), which TRL's GRPOTrainer has no
equivalent of, and shared-prompt forwards where they are exact and cheaper
(train.shared_prompt=auto: each prompt once per group of n samples, one packed row with a 4-D
attention mask). --budget N / --budget 0 and --shared-prompt / --no-shared-prompt force them
(--budget 0 --no-shared-prompt: TRL's fixed, padded micro-batches).

Step time: ours is the loop's `time/step` (rollout -> reward -> experience -> train -> weight
sync); TRL's is on_step_begin -> on_step_end of its trainer (generation, reward, logprobs and
the optimizer step all happen inside). The first --warmup steps are dropped (compilation,
allocator warm-up); the median and minimum of the rest are reported, then the ratios ours / TRL
(goal <= 0.3). On a shared machine trust the minima (other jobs' load moves the medians).

Utilisation: this CPU's matmul peak is measured first in the same process (the best of a few
2048^3 matmuls in fp32 and bf16 on the same threads); our train phase (time/train, the
optimizer step included) does 6 x N x T FLOPs for T tokens and N the non-embedding
parameters, plus the output head on the response tokens (6 x vocab x hidden each) and causal
attention (12 x layers x hidden x mean context per token). Printed over the peak of the
run's dtype twice: "executed" counts the tokens our forwards ran (train/forward_tokens: each
shared prompt once, no padding), "useful" every sample's tokens (the work TRL does; shared
prompts let it exceed 100%).
Requires `pip install trl` (not a project dependency).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "grpo_tiny.yaml"


def run_ours(args, run_dir: Path) -> list[float]:
    """Per-step seconds of our colocated GRPO loop (a fresh process)."""
    from hpc_rlhf.metrics.logger import read_metrics
    cmd = [sys.executable, "-m", "hpc_rlhf.launch.main", "--config", str(CONFIG),
           f"launch.run_dir={run_dir}", f"model.path={args.model}", f"train.num_steps={args.steps}",
           f"rollout.engine={args.engine}", f"rollout.prompts_per_step={args.prompts}",
           f"rollout.n_samples_per_prompt={args.n}", f"rollout.max_new_tokens={args.max_new_tokens}",
           f"train.batch_size={args.prompts * args.n}", f"train.micro_batch_size={args.micro}",
           *([] if args.budget is None else [f"train.max_tokens_per_micro_batch={args.budget}"]),
           *([] if args.shared_prompt is None
             else [f"train.shared_prompt={str(args.shared_prompt).lower()}"]),
           f"train.actor_lr={args.lr}", "train.adam_beta2=0.95", "train.max_grad_norm=1.0",
           f"train.seed={args.seed}", "algorithm.name=grpo", "algorithm.kl_coef=0",
           f"model.dtype={args.dtype}", f"model.attn_implementation={args.attn}",
           "checkpoint.save_every=0", "logging.progress_bar=false", "logging.tensorboard=false",
           *args.ours_override]
    _run(cmd, run_dir.parent / "ours.log")
    return read_metrics(run_dir)


def run_trl(args, out_dir: Path) -> list[float]:
    """Per-step seconds of TRL's GRPOTrainer (a fresh process running `trl_worker`)."""
    result = out_dir / "trl_steps.json"
    cmd = [sys.executable, __file__, "--trl-worker", str(result), *sys.argv[1:]]
    _run(cmd, out_dir / "trl.log")
    return json.loads(result.read_text())


def _run(cmd: list, log: Path) -> None:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               TOKENIZERS_PARALLELISM="false")
    with open(log, "w") as out:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"exit {rc}: {' '.join(map(str, cmd))}\n{tail}")


def trl_worker(args, result: Path) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from hpc_rlhf.config import load_config
    from hpc_rlhf.data.tasks import task_reward
    from hpc_rlhf.models.resolve import resolve_model_path
    from hpc_rlhf.recipes.rl.prompts import load_prompts

    cfg = load_config(str(CONFIG), [f"model.path={args.model}"])
    path = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    # Exactly our prompt token ids (chat template applied), as text TRL tokenizes back.
    prompts = load_prompts(cfg.data.prompts, tok, apply_chat_template=cfg.data.apply_chat_template,
                           max_prompt_len=cfg.data.max_prompt_len,
                           num_task_prompts=cfg.data.num_task_prompts, seed=cfg.data.seed)
    data = Dataset.from_list([{"prompt": tok.decode(p.ids), "label": p.label} for p in prompts])
    reward = task_reward(cfg.data.prompts)

    def repeat_reward(prompts, completions, label, **_):
        return [reward(c, lab) for c, lab in zip(completions, label)]

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self._t0 = [], 0.0

        def on_step_begin(self, *a, **k):
            self._t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self._t0)

    batch = args.prompts * args.n
    conf = GRPOConfig(
        output_dir=str(result.parent / "trl_out"), use_cpu=True, bf16=args.dtype == "bfloat16",
        fp16=False,
        gradient_checkpointing=False, per_device_train_batch_size=args.micro,
        gradient_accumulation_steps=batch // args.micro, num_generations=args.n,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=args.lr, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0,
        lr_scheduler_type="constant", warmup_steps=0, beta=0.0, num_iterations=1,
        max_steps=args.steps, logging_steps=10**6, save_strategy="no", report_to="none",
        seed=args.seed, dataloader_num_workers=0, disable_tqdm=True)
    from hpc_rlhf.models.resolve import attn_implementation
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=attn_implementation(args.attn))
    timer = StepTimes()
    trainer = GRPOTrainer(model=model, reward_funcs=repeat_reward, args=conf, train_dataset=data,
                          processing_class=tok, callbacks=[timer])
    trainer.train()
    result.write_text(json.dumps(timer.times))


def summary(name: str, kept: list[float], warmup: int) -> tuple[float, float]:
    med = statistics.median(kept)
    print(f"  {name:<5} median {med * 1e3:8.1f} ms/step  min {min(kept) * 1e3:8.1f}  "
          f"(max {max(kept) * 1e3:.1f}; {len(kept)} steps, each run's first {warmup} dropped)")
    print(f"        steps (ms): {' '.join(f'{t * 1e3:.0f}' for t in kept)}")
    return med, min(kept)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny:llama", help="model.path (default: the tiny Llama)")
    ap.add_argument("--engine", default="vllm", choices=("vllm", "hf"), help="our rollout engine")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--n", type=int, default=8, help="samples per prompt (the GRPO group)")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--micro", type=int, default=16, help="micro-batch size (both sides)")
    ap.add_argument("--budget", type=int, default=None,
                    help="ours: train.max_tokens_per_micro_batch (default: the project's, auto; "
                         "0 = fixed --micro batches)")
    ap.add_argument("--shared-prompt", action=argparse.BooleanOptionalAction, default=None,
                    help="ours: force train.shared_prompt on/off (default: the project's, auto)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="training/rollout precision (both sides)")
    ap.add_argument("--attn", default="auto", choices=("auto", "eager", "sdpa"),
                    help="HF attention kernel of the trained model (both sides; auto: eager on "
                         "CPU, sdpa on GPU, as our model.attn_implementation=auto)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1, help="alternate ours/TRL this many times")
    ap.add_argument("--ours-override", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for our run (repeatable), e.g. train.zero_stage=0")
    ap.add_argument("--trl-worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.trl_worker:
        return trl_worker(args, Path(args.trl_worker))
    if args.steps <= args.warmup:
        ap.error(f"--steps={args.steps} must exceed --warmup={args.warmup}")
    if (args.prompts * args.n) % args.micro:
        ap.error(f"--micro={args.micro} must divide prompts x n = {args.prompts * args.n}")
    try:
        import trl
    except ImportError:
        raise SystemExit("TRL is not installed: pip install trl (a benchmark-only dependency)")
    peak = {dt: matmul_peak(dt) for dt in ("float32", "bfloat16")}
    ours_t, trl_t, ours_rows = [], [], []
    with tempfile.TemporaryDirectory(prefix="grpo_step_") as tmp:
        for r in range(args.rounds):
            d = Path(tmp) / f"round{r}"
            d.mkdir()
            t0 = time.perf_counter()
            rows = run_ours(args, d / "ours")[args.warmup:]
            ours_rows += rows
            ours_t += [m["time/step"] for m in rows]
            t1 = time.perf_counter()
            trl_t += run_trl(args, d)[args.warmup:]
            print(f"round {r + 1}: process wall ours {t1 - t0:.1f} s, TRL "
                  f"{time.perf_counter() - t1:.1f} s", flush=True)
    import torch
    print(f"model={args.model} prompts={args.prompts} n={args.n} "
          f"max_new_tokens={args.max_new_tokens} micro={args.micro} "
          f"budget={'default' if args.budget is None else args.budget} "
          f"shared_prompt={'default' if args.shared_prompt is None else args.shared_prompt} "
          f"engine={args.engine} "
          f"dtype={args.dtype} attn={args.attn} "
          f"trl={trl.__version__} torch threads={torch.get_num_threads()}")
    print(f"  matmul peak: {peak['float32'] / 1e9:.0f} GFLOP/s fp32, "
          f"{peak['bfloat16'] / 1e9:.0f} GFLOP/s bf16")
    utilisation(args, ours_rows, peak[args.dtype])
    ours_med, ours_min = summary("ours", ours_t, args.warmup)
    trl_med, trl_min = summary("TRL", trl_t, args.warmup)
    # On a shared machine the median moves with other jobs' load; the minimum is the closest
    # to the uncontended cost. Both are printed; compare runs on an idle machine.
    print(f"ratio ours/TRL = {ours_med / trl_med:.2f} (medians), {ours_min / trl_min:.2f} "
          f"(minima)  (goal <= 0.3)")


def matmul_peak(dtype: str, n: int = 2048, reps: int = 5) -> float:
    """Best FLOP/s of an n^3 matmul in `dtype` on this process's threads."""
    import torch
    dt = getattr(torch, dtype)
    a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
    a @ b   # warm-up (thread pool, kernel selection)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def train_flops(c, tokens: float, response_tokens: float, mean_len: float) -> float:
    """FLOPs of one train phase (forward + backward) over `tokens` for the model of HF config
    `c` (see the module doc)."""
    h, layers, vocab = c.hidden_size, c.num_hidden_layers, c.vocab_size
    kv = getattr(c, "num_key_value_heads", c.num_attention_heads) / c.num_attention_heads
    per_layer = h * h * (2 + 2 * kv) + 3 * h * c.intermediate_size   # q, o, k, v; MLP
    return (6 * layers * per_layer * tokens + 6 * vocab * h * response_tokens
            + 12 * layers * h * (mean_len / 2) * tokens)


def utilisation(args, rows: list[dict], peak: float) -> None:
    """Our train phase's FLOP/s against the matmul peak of the run's dtype: "useful" counts
    every sample's tokens (what a padded trainer computes, TRL's work), "executed" the tokens
    our forwards ran (train/forward_tokens: each shared prompt once, no padding)."""
    from transformers import AutoConfig

    from hpc_rlhf.models.resolve import resolve_model_path
    config = AutoConfig.from_pretrained(resolve_model_path(args.model))
    samples = args.prompts * args.n
    useful, executed = [], []
    for m in rows:
        tokens, resp, t = m["train/tokens"], m["rollout/tokens"], m["time/train"]
        useful.append(train_flops(config, tokens, resp, tokens / samples) / t)
        executed.append(train_flops(config, m["train/forward_tokens"], resp, tokens / samples) / t)
    u, e = statistics.median(useful), statistics.median(executed)
    print(f"  ours train phase: {statistics.median(m['time/train'] for m in rows):.2f} s of "
          f"{statistics.median(m['time/step'] for m in rows):.2f} s per step (rollout "
          f"{statistics.median(m['time/rollout'] for m in rows):.2f} s); median FLOP/s over the "
          f"{args.dtype} matmul peak: executed {e / 1e9:.0f} GFLOP/s = {e / peak:.0%}, useful "
          f"{u / 1e9:.0f} GFLOP/s = {u / peak:.0%} (goal >= 60% in fp32)")


if __name__ == "__main__":
    main()
