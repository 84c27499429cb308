"""Small generated datasets for tests and CPU smoke runs: reverse a short lowercase word.

`python -m hpc_rlhf.data.synthetic OUT_DIR` writes, for split in (train, eval):
  sft_{split}.jsonl    {"prompt": "reverse: abc", "response": "cba"}
  chat_{split}.jsonl   {"prompt": [user, assistant, user]... two-turn conversations}
  pairs_{split}.jsonl  {"prompt", "chosen": reversed word, "rejected": a random word}
  kto_{split}.jsonl    {"prompt", "response", "label": true/false}
  prm_{split}.jsonl    {"prompt", "response": [steps], "label": [0/1 per step]}
  csft_{split}.jsonl   {"prompt", "response", "score": 8 (right) or 0 (wrong)}
The configs configs/{sft,dpo,rm,csft}_tiny.yaml read these from runs/tiny_data/.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

LETTERS = "abcdefghij"
# Wrong answers use other letters, so a tiny model can tell them apart from a few dozen steps
# (the tests check that preference training generalises to held-out prompts, not reasoning).
WRONG_LETTERS = "klmnopqrst"
KINDS = ("sft", "chat", "pairs", "kto", "prm", "csft")
FILE_NAMES = tuple(f"{kind}_{split}.jsonl" for kind in KINDS for split in ("train", "eval"))


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))


def _other(rng: random.Random, avoid: str) -> str:
    """A wrong answer of the same length (never equal to `avoid`)."""
    return "".join(rng.choice(WRONG_LETTERS) for _ in range(len(avoid)))


def toy_rows(kind: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(f"{kind}-{seed}")
    rows = []
    for _ in range(n):
        w = _word(rng)
        prompt, answer = f"reverse: {w}", w[::-1]
        if kind == "sft":
            rows.append({"prompt": prompt, "response": answer})
        elif kind == "chat":
            w2 = _word(rng)
            rows.append({"prompt": [{"role": "user", "content": prompt},
                                    {"role": "assistant", "content": answer},
                                    {"role": "user", "content": f"reverse: {w2}"},
                                    {"role": "assistant", "content": w2[::-1]}]})
        elif kind == "pairs":
            rows.append({"prompt": prompt, "chosen": answer, "rejected": _other(rng, answer)})
        elif kind == "kto":
            good = rng.random() < 0.5
            rows.append({"prompt": prompt, "response": answer if good else _other(rng, answer),
                         "label": good})
        elif kind == "csft":  # a scored response: right answers 8, wrong ones 0 (csft_tiny)
            good = rng.random() < 0.5
            rows.append({"prompt": prompt, "response": answer if good else _other(rng, answer),
                         "score": 8 if good else 0})
        elif kind == "prm":   # step i writes one reversed character; a wrong one is a bad step
            steps, labels = [], []
            for ch in answer:
                ok = rng.random() < 0.7
                steps.append(ch if ok else _other(rng, ch))
                labels.append(int(ok))
            rows.append({"prompt": prompt, "response": steps, "label": labels})
        else:
            raise ValueError(f"kind={kind!r} is not a toy dataset kind")
    return rows


def write_toy_datasets(out_dir: str | Path, n_train: int = 256, n_eval: int = 64,
                       seed: int = 0) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for kind in KINDS:
        for split, n, s in (("train", n_train, seed), ("eval", n_eval, seed + 1000)):
            with (out / f"{kind}_{split}.jsonl").open("w") as f:
                for row in toy_rows(kind, n, s):
                    f.write(json.dumps(row) + "\n")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", nargs="?", default="runs/tiny_data")
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--n-eval", type=int, default=64)
    args = p.parse_args(argv)
    print(write_toy_datasets(args.out_dir, args.n_train, args.n_eval))


if __name__ == "__main__":
    main()
