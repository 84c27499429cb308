"""`python -m hpc_rlhf.submit export RUN_DIR_OR_CHECKPOINT [--out DIR]`: any checkpoint of a
run (a checkpoints/step_N directory, or a run directory: its newest) as a plain HF model
directory, on a login node: no world, no GPU. The weights are the optimizer's fp32 master
copy cast to the dtype the run trained in, LoRA adapters merged, the tokenizer of
model.path; the same directory the run's own export writes at its end."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def export_checkpoint(source: str, out: str | None = None) -> Path:
    from hpc_rlhf.checkpoint.export import export_hf
    from hpc_rlhf.checkpoint.layout import branch_source, step_dir_name
    from hpc_rlhf.config import load_config
    from hpc_rlhf.engine.deepspeed_strategy import consolidated_state
    from hpc_rlhf.models.actor import load_causal_lm
    from hpc_rlhf.recipes.common import load_tokenizer
    try:
        root, step = branch_source(source)
    except ValueError as e:
        raise ValueError(str(e).replace("checkpoint.resume_from=", "")) from None
    step_dir, run_dir = root / step_dir_name(step), root.parent
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"{run_dir} has no config.yaml: export needs the run directory's "
                         "config to rebuild the model")
    cfg = load_config(run_dir / "config.yaml")
    tag = "actor" if (step_dir / "actor").is_dir() else "model"
    if cfg.train.trainer in ("rm", "prm"):
        raise ValueError(f"train.trainer={cfg.train.trainer!r}: export covers the causal-LM "
                         "trainers; reward models are exported by their run "
                         "(checkpoint.export_hf=true)")
    state, dtype = consolidated_state(step_dir, tag)
    model = load_causal_lm(cfg.model.path, cfg.model, trained=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight", "base_model.model.lm_head.weight"}
    if unexpected or set(missing) - tied:
        raise ValueError(f"{step_dir / tag} does not match the model of {run_dir}/config.yaml "
                         f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    out_dir = Path(out) if out else run_dir / f"export_step_{step}"
    return export_hf(model, out_dir, load_tokenizer(cfg.model.path), dtype=dtype)


def main(argv: list) -> int:
    p = argparse.ArgumentParser(prog="python -m hpc_rlhf.submit export",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="checkpoints/step_N directory, or a run directory (newest)")
    p.add_argument("--out", default=None, help="output directory (default: <run "
                   "dir>/export_step_<N>; written atomically)")
    args = p.parse_args(argv)
    try:
        out = export_checkpoint(args.source, args.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    print(f"[export] {out}")
    return 0
