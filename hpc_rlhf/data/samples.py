"""Rows -> tokenized training samples for each trainer, with max-length filtering and
bad-row handling (fail naming file/row/field, or skip and count with data.skip_bad_rows).

Field mapping comes from DataConfig: input_key (prompt string or chat messages), output_key
(response), chosen_key / rejected_key (preference pairs, strings or full conversations),
label_key (KTO desirable flag, PRM step labels, CSFT reward).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hpc_rlhf.data.chat import ChatFormat, TemplateError, as_messages
from hpc_rlhf.data.readers import Row, read_rows
from hpc_rlhf.data.rows import (DataError, DataStats, get_bool, get_field, get_float, get_messages,
                                get_text, get_text_or_messages)

# Optional per-pair reward margin for the Bradley-Terry RM loss (no config key yet).
MARGIN_KEY = "margin"


@dataclass(frozen=True)
class SFTSample:
    input_ids: list[int]
    loss_mask: list[int]        # 1 on tokens that are trained on (assistant turns)

    def __len__(self):
        return len(self.input_ids)


@dataclass(frozen=True)
class PairSample:
    prompt_ids: list[int]
    chosen_ids: list[int]       # response tokens only
    rejected_ids: list[int]
    margin: float = 0.0

    def __len__(self):
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass(frozen=True)
class KTOSample:
    prompt_ids: list[int]
    response_ids: list[int]
    desirable: bool

    def __len__(self):
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass(frozen=True)
class PRMSample:
    input_ids: list[int]
    step_positions: list[int]   # index of each step's placeholder token in input_ids
    step_labels: list           # 1 = good step, 0 = bad (ints); or P(good) (floats, soft)

    def __len__(self):
        return len(self.input_ids)


@dataclass(frozen=True)
class PromptSample:
    prompt_ids: list[int]
    prompt: object              # the raw prompt (string or messages), for re-templating
    label: object = None        # reference answer if the row has one

    def __len__(self):
        return len(self.prompt_ids)


def _need_response(row: Row, key: str, ids: list[int]) -> list[int]:
    if not ids:
        raise DataError(row.file, row.index, key, "tokenizes to no response tokens")
    return ids


# ---- one row -> one sample ----------------------------------------------------------------
def split_reply(row: Row, key: str, value, prompt):
    """(prompt, reply text) of a response field holding a message list: a whole conversation
    ending with the assistant's reply (its earlier messages are the prompt unless the row has
    a prompt field), or, as TRL's and OpenRLHF's conversational datasets store it, only the
    assistant's message(s) answering the row's prompt."""
    if not value or not all(isinstance(m, dict) for m in value):
        kinds = sorted({type(m).__name__ for m in value}) or ["nothing"]
        raise DataError(row.file, row.index, key, f"is a list of {'/'.join(kinds)}, expected a "
                        "string or a list of {'role', 'content'} messages")
    messages = get_messages(row, key, value)
    if messages[-1]["role"] != "assistant":
        raise DataError(row.file, row.index, key, "is a message list whose last message is not "
                        f"the assistant's (role {messages[-1]['role']!r}); nothing to train on")
    if prompt is None:
        if len(messages) < 2:
            raise DataError(row.file, row.index, key, "holds only the assistant's reply but the "
                            "row has no prompt field (data.input_key)")
        prompt = messages[:-1]
    elif len(messages) > 1 and messages[0]["role"] == "assistant":  # continues the prompt
        prompt = as_messages(prompt) + messages[:-1]
    return prompt, messages[-1]["content"]


def sft_sample(row: Row, fmt: ChatFormat, input_key: str, output_key: str) -> SFTSample:
    """Prompt + response (loss on the response), or a whole conversation in `input_key` when
    the row has no `output_key` (loss on every assistant turn). The response may be a string
    or a message list (see `split_reply`)."""
    prompt = get_text_or_messages(row, input_key)
    response = get_field(row, output_key, required=isinstance(prompt, str))
    if isinstance(response, list):
        prompt, response = split_reply(row, output_key, response, prompt)
    if response is None:
        if not any(m["role"] == "assistant" for m in prompt):
            raise DataError(row.file, row.index, output_key, "is missing and the conversation "
                            f"in {input_key!r} has no assistant turn to train on")
        ids, mask = fmt.conversation(prompt)
    else:
        if not isinstance(response, str) or not response.strip():
            response = get_text(row, output_key)  # raises the field's type/empty error
        if fmt.apply_chat_template:
            ids, mask = fmt.conversation(as_messages(prompt) + [
                {"role": "assistant", "content": response}])
        else:
            p, r = fmt.prompt_response(prompt, response)
            ids, mask = p + r, [0] * len(p) + [1] * len(r)
    if mask[0]:
        raise DataError(row.file, row.index, input_key, "leaves no prompt token before the "
                        "first trained token")
    _need_response(row, output_key, [t for t, m in zip(ids, mask) if m])
    return SFTSample(ids, mask)


def pretrain_sample(row: Row, fmt: ChatFormat, input_key: str) -> SFTSample:
    """Raw text (data.pretrain_mode, OpenRLHF's --pretrain_mode): the loss is on every token
    after the first, the text ends with eos; no chat template."""
    ids = fmt.encode(get_text(row, input_key)) + [fmt.eos_id]
    return SFTSample(ids, [0] + [1] * (len(ids) - 1))


def _response_of(row: Row, fmt: ChatFormat, key: str, prompt) -> tuple[list[int], list[int]]:
    """(prompt_ids, response_ids) from a response string or a message list."""
    value = get_text_or_messages(row, key)
    if isinstance(value, list):
        prompt, value = split_reply(row, key, value, prompt)
    if prompt is None:
        raise DataError(row.file, row.index, key, "is a plain response but the row has no "
                        "prompt field")
    p, r = fmt.prompt_response(prompt, value)
    return p, _need_response(row, key, r)


def pair_sample(row: Row, fmt: ChatFormat, input_key: str, chosen_key: str,
                rejected_key: str, margin_key: str = MARGIN_KEY) -> PairSample:
    """A (prompt, chosen, rejected) pair; `margin_key` (optional in the row) is the reward
    model's margin, 0 when absent. DPO ignores it."""
    prompt = get_field(row, input_key, required=False)
    if prompt is not None:
        prompt = get_text_or_messages(row, input_key)
    pc, chosen = _response_of(row, fmt, chosen_key, prompt)
    pr, rejected = _response_of(row, fmt, rejected_key, prompt)
    if pc != pr:
        raise DataError(row.file, row.index, rejected_key, "has a different prompt than "
                        f"{chosen_key!r}; a pair must share its prompt")
    margin = get_float(row, margin_key) if margin_key in row.data else 0.0
    return PairSample(pc, chosen, rejected, margin)


def kto_sample(row: Row, fmt: ChatFormat, input_key: str, output_key: str,
               label_key: str) -> KTOSample:
    """A (prompt, completion, desirable) row; the completion may be a message list."""
    prompt = get_text_or_messages(row, input_key)
    completion = get_field(row, output_key)
    if isinstance(completion, list):
        prompt, completion = split_reply(row, output_key, completion, prompt)
    else:
        completion = get_text(row, output_key)
    p, r = fmt.prompt_response(prompt, completion)
    return KTOSample(p, _need_response(row, output_key, r), get_bool(row, label_key))


def prm_sample(row: Row, fmt: ChatFormat, input_key: str, output_key: str, label_key: str,
               step_tag_id: int, step_tag: str | None = None) -> PRMSample:
    """Steps (a list of strings in output_key) each followed by the placeholder token; labels
    (a list in label_key, one per step) are predicted at the placeholders.

    OpenRLHF's form is read too: no output_key, and input_key one text in which `step_tag`
    (the data option prm_step_tag, e.g. 'ки') follows each step; no chat template. Labels
    are booleans/0/1/'+'/'-' (hard) or, when any is a float strictly between 0 and 1, the
    probability that the step is good (soft labels, all kept as floats)."""
    prompt = get_text_or_messages(row, input_key)
    if output_key not in row.data and isinstance(prompt, str) and step_tag \
            and step_tag in prompt:
        *steps, rest = prompt.split(step_tag)
        if rest.strip():
            raise DataError(row.file, row.index, input_key, f"has text after its last step tag "
                            f"{step_tag!r}; every step must end with the tag")
        ids = []
    else:
        steps = get_field(row, output_key)
        if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
            raise DataError(row.file, row.index, output_key, f"is {steps!r}, expected a non-empty "
                            "list of step strings")
        ids = fmt.prompt_ids(prompt)
    labels = get_field(row, label_key)
    if not isinstance(labels, list) or len(labels) != len(steps):
        raise DataError(row.file, row.index, label_key, f"is {labels!r}, expected a list of "
                        f"{len(steps)} labels (one per step)")
    positions = []
    for step in steps:
        ids += fmt.encode(step) + [step_tag_id]
        positions.append(len(ids) - 1)
    return PRMSample(ids, positions, _step_labels(row, label_key, labels))


def _step_labels(row: Row, label_key: str, labels: list) -> list:
    """Hard labels as ints, or soft labels (any float strictly in (0, 1)) as floats."""
    soft = any(isinstance(x, float) and 0.0 < x < 1.0 for x in labels)
    out = []
    for i, label in enumerate(labels):
        if soft:
            if isinstance(label, bool) or not isinstance(label, (int, float)) \
                    or not 0.0 <= label <= 1.0:
                raise DataError(row.file, row.index, f"{label_key}[{i}]", f"is {label!r}; soft "
                                "labels must all be numbers in [0, 1]")
            out.append(float(label))
        else:
            fake = Row({f"{label_key}[{i}]": label}, row.file, row.index)
            out.append(int(get_bool(fake, f"{label_key}[{i}]")))
    return out


def prompt_sample(row: Row, fmt: ChatFormat, input_key: str, label_key: str) -> PromptSample:
    prompt = get_text_or_messages(row, input_key)
    return PromptSample(fmt.prompt_ids(prompt), prompt, get_field(row, label_key, required=False))


# ---- a whole source -----------------------------------------------------------------------
def split_sources(path) -> list[str]:
    """The data sources of a (possibly comma-separated) data.prompts value."""
    return [p.strip() for p in str(path).split(",") if p.strip()]


def mix_sources(parts: list[list], probs, seed: int) -> list:
    """One list of sum(len(part)) samples: each position draws its source with `probs`
    (seeded), taking that source's next sample; a source that runs out starts over, so the
    mixture keeps the proportions (OpenRLHF's --prompt_data_probs / --dataset_probs)."""
    import random
    rng = random.Random(seed)
    weights = list(probs) if probs else [1.0] * len(parts)
    cursors, out = [0] * len(parts), []
    for _ in range(sum(len(p) for p in parts)):
        i = rng.choices(range(len(parts)), weights=weights)[0]
        out.append(parts[i][cursors[i] % len(parts[i])])
        cursors[i] += 1
    return out


def load_samples(path: str, make: Callable[[Row], object], *, max_len: int,
                 skip_bad_rows: bool = False, limit: int | None = None,
                 stats: DataStats | None = None, probs=(), seed: int = 0
                 ) -> tuple[list, DataStats]:
    """Apply `make` to every row of `path`; drop (and count) samples longer than `max_len`.

    `path` may name several sources, comma-separated: they are mixed with `probs` (equal
    weights when empty) by `mix_sources`, then `limit` applies. A bad row raises its DataError
    unless `skip_bad_rows`, where it is counted by field. Raises if nothing is left, naming
    why rows were dropped.
    """
    stats = stats or DataStats()
    sources = split_sources(path)
    if len(sources) > 1:
        if probs and len(probs) != len(sources):
            raise ValueError(f"data.prompts names {len(sources)} sources but "
                             f"data.prompts_probs has {len(probs)} weights; give one per source")
        parts = [load_samples(src, make, max_len=max_len, skip_bad_rows=skip_bad_rows,
                              stats=stats)[0] for src in sources]
        mixed = mix_sources(parts, probs, seed)
        return (mixed[:limit] if limit else mixed), stats
    out = []

    def bad_line(error: DataError) -> None:  # data.skip_bad_rows: a line that is not JSON
        stats.read += 1
        stats.skip("not a JSON object")

    for row in read_rows(path, bad_line if skip_bad_rows else None):
        stats.read += 1
        try:
            sample = make(row)
        except (DataError, TemplateError) as e:
            if not skip_bad_rows:
                if isinstance(e, TemplateError):
                    raise DataError(row.file, row.index, None, str(e)) from e
                raise
            stats.skip(f"bad field {e.field!r}" if isinstance(e, DataError) else "template")
            continue
        if len(sample) > max_len:
            stats.skip(f"longer than data.max_len={max_len}")
            continue
        out.append(sample)
        stats.kept += 1
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"no usable samples in {path}: {stats.summary()}; check the data.*_key "
                         "options, data.max_len and the file")
    return out, stats

