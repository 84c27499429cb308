"""Conditional SFT (reward-conditioned SFT, as in SteerLM / OpenRLHF's "conditional SFT").

Every (prompt, response, score) row becomes an SFT sample whose prompt carries a quality tag,
so the model learns what responses of each score look like; at generation time the prompt is
tagged with the top score to ask for the best kind of response.

    scores = data.label_key of every row, min-max normalised to [0, 1] over the train file
    tag    = "<rm_score>: 0.8"  (normalised score, one decimal)
    prompt = "<prompt>\n<tag>"                  (string prompts; chat prompts: the tag is
                                                 appended to the last message)
    train_sft(conditioned samples)              (the SFT recipe's loop; loss on responses only)
    generation: conditioned_prompt_ids(fmt, prompt, score=TOP_SCORE)

Data: JSONL/Parquet rows with data.input_key (prompt), data.output_key (response) and
data.label_key (a number: reward-model score, rating, ...). The normalisation range is written
to run_dir/csft_scores.json so generation can tag prompts the same way.
"""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from hpc_rlhf.data import load_samples, read_rows, sft_sample
from hpc_rlhf.data.readers import Row
from hpc_rlhf.data.rows import DataError, get_float, get_text_or_messages
from hpc_rlhf.models.actor import load_causal_lm
from hpc_rlhf.recipes.common import chat_format, load_tokenizer, make_strategy
from hpc_rlhf.recipes.sft import train_sft
from hpc_rlhf.runtime import RunContext

SCORE_TAG = "<rm_score>: {:.1f}"
TOP_SCORE = 1.0


def score_range(path: str, label_key: str, skip_bad_rows: bool = False) -> tuple[float, float]:
    """(min, max) of the numeric `label_key` values in `path` (bad rows are left to the
    sample builder, which raises or counts them)."""
    values = []
    for row in read_rows(path, (lambda error: None) if skip_bad_rows else None):
        try:
            values.append(get_float(row, label_key))
        except DataError:
            continue
    if not values:
        raise ValueError(f"conditional SFT: no row of {path} has a numeric score in "
                         f"data.label_key={label_key!r}; set data.label_key to the score field")
    lo, hi = min(values), max(values)
    if lo == hi:
        raise ValueError(f"conditional SFT: every score in {path} field {label_key!r} is {lo}; "
                         "the tag would carry no information (use plain SFT, or give scored "
                         "responses of different quality)")
    return lo, hi


def normalize(score: float, lo: float, hi: float) -> float:
    """score -> [0, 1] by the train file's range (clamped for held-out rows outside it)."""
    return min(max((score - lo) / (hi - lo), 0.0), 1.0)


def score_tag(score: float) -> str:
    return SCORE_TAG.format(score)


def conditioned_prompt(prompt, score: float):
    """The prompt (string or messages) with the tag of a normalised score appended, right
    before where the response starts (a small model finds it there most easily)."""
    tag = score_tag(score)
    if isinstance(prompt, str):
        return f"{prompt}\n{tag}"
    messages = [dict(m) for m in prompt]
    messages[-1]["content"] = f"{messages[-1]['content']}\n{tag}"
    return messages


def conditioned_prompt_ids(fmt, prompt, score: float = TOP_SCORE) -> list[int]:
    """Token ids to generate from, asking for a response of `score` (default: the best)."""
    return fmt.prompt_ids(conditioned_prompt(prompt, score))


def csft_sample(row: Row, fmt, input_key: str, output_key: str, label_key: str, lo: float,
                hi: float):
    """One scored row -> an SFTSample of the tagged prompt and its response."""
    score = normalize(get_float(row, label_key), lo, hi)
    prompt = conditioned_prompt(get_text_or_messages(row, input_key), score)
    return sft_sample(Row({**row.data, input_key: prompt}, row.file, row.index), fmt,
                      input_key, output_key)


def run(cfg, topo, run_dir: Path) -> None:
    strategy = make_strategy(cfg)
    tokenizer = load_tokenizer(cfg.model.path)
    d = cfg.data
    lo, hi = score_range(d.prompts, d.label_key, d.skip_bad_rows)
    make = partial(csft_sample, fmt=chat_format(tokenizer, d), input_key=d.input_key,
                   output_key=d.output_key, label_key=d.label_key, lo=lo, hi=hi)
    samples, stats = load_samples(d.prompts, make, max_len=d.max_len,
                                  skip_bad_rows=d.skip_bad_rows, limit=d.max_samples or None,
                                  probs=d.prompts_probs, seed=d.seed)
    eval_samples = (load_samples(d.eval_prompts, make, max_len=d.max_len,
                                 skip_bad_rows=d.skip_bad_rows)[0] if d.eval_prompts else None)
    if strategy.rank == 0:
        print(f"csft data {d.prompts}: {stats.summary()}; scores [{lo}, {hi}] -> [0, 1]",
              flush=True)
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "csft_scores.json").write_text(json.dumps(
            {"score_min": lo, "score_max": hi, "tag": SCORE_TAG, "top_score": TOP_SCORE}))
    engine = strategy.prepare_model(load_causal_lm(cfg.model.path, cfg.model, trained=True))
    ctx = RunContext(cfg, strategy, run_dir, name="csft")
    ckpt = ctx.checkpoints({"model": engine})
    train_sft(engine, strategy, samples, train_cfg=cfg.train, packing=d.packing,
              pad_id=tokenizer.pad_token_id, log=ctx.log, eval_samples=eval_samples, ckpt=ckpt)
    ctx.finish(engine, tokenizer)
