"""Read rows (dicts) from local JSONL / JSON / Parquet / Arrow files and HF `datasets` saved
to disk. Each row comes with its source file and 0-based row number, so errors can name both.

JSONL needs nothing; Parquet, Arrow and `datasets` directories need pyarrow (imported lazily,
with a clear message when missing). A directory is read as a `save_to_disk` dataset when it has
`state.json` / `dataset_info.json`, else every data file inside it is read in name order.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hpc_rlhf.data.rows import DataError

SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")


@dataclass(frozen=True)
class Row:
    """One record and where it came from."""
    data: dict
    file: str
    index: int      # 0-based row number inside `file` (line number - 1 for JSONL)


def _pyarrow(path: Path):
    try:
        import pyarrow  # noqa: F401
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as e:
        raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow), or convert the "
                          "data to .jsonl (one JSON object per line)") from e
    return pyarrow


def _jsonl(path: Path, bad_line=None) -> Iterator[Row]:
    """Rows of a JSONL file. A line that is not a JSON object raises its DataError, or, with
    `bad_line` (data.skip_bad_rows), is passed to bad_line(error) and skipped."""
    with path.open("r", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                error = DataError(str(path), i, None, f"is not valid JSON ({e.msg} at column "
                                  f"{e.colno})", "fix the line or set data.skip_bad_rows=true")
                if bad_line is None:
                    raise error from e
                bad_line(error)
                continue
            if not isinstance(obj, dict):
                error = DataError(str(path), i, None, f"is a JSON {type(obj).__name__}, not an "
                                  "object", "write one JSON object per line or set "
                                  "data.skip_bad_rows=true")
                if bad_line is None:
                    raise error
                bad_line(error)
                continue
            yield Row(obj, str(path), i)


def _json(path: Path) -> Iterator[Row]:
    obj = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(obj, list):
        raise DataError(str(path), None, None, f"holds a JSON {type(obj).__name__}; expected a "
                        "list of objects", "use a JSON list or JSONL")
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise DataError(str(path), i, None, f"is a JSON {type(item).__name__}, not an "
                            "object", "make every list item an object")
        yield Row(item, str(path), i)


def _table_rows(table, path: Path) -> Iterator[Row]:
    for i, item in enumerate(table.to_pylist()):
        yield Row(item, str(path), i)


def _parquet(path: Path) -> Iterator[Row]:
    pa = _pyarrow(path)
    yield from _table_rows(pa.parquet.read_table(path), path)


def _arrow(path: Path) -> Iterator[Row]:
    pa = _pyarrow(path)
    with pa.memory_map(str(path), "r") as source:
        try:   # `datasets` writes the IPC *stream* format; plain Arrow files use the file format
            table = pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            table = pa.ipc.open_file(source).read_all()
    yield from _table_rows(table, path)


_READERS = {".jsonl": _jsonl, ".json": _json, ".parquet": _parquet, ".arrow": _arrow}


def data_files(path: str | Path) -> list[Path]:
    """The files a data source names: the file itself, or a directory's data files in order."""
    p = Path(path)
    if not p.exists():
        cached = hub_cache_snapshot(str(path))
        if cached is not None:
            return _hub_files(cached, str(path))
        name = str(path).split(":", 1)[0]
        if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) and not Path(name).parent.is_dir():
            raise FileNotFoundError(
                f"data source {str(path)!r} is neither a local file nor a dataset in the local "
                "hub cache (hub datasets are read from there, never downloaded by a job); "
                f"download it on a login node: huggingface-cli download --repo-type dataset "
                f"{name} (or save it with datasets' save_to_disk and give that directory)")
        raise FileNotFoundError(f"data source {str(p)!r} does not exist; give a .jsonl/.json/"
                                ".parquet/.arrow file, a directory (datasets.save_to_disk), or "
                                "a hub dataset name already in the local hub cache")
    if p.is_file():
        if p.suffix not in _READERS:
            raise ValueError(f"data source {str(p)!r} has suffix {p.suffix!r}; supported: "
                             f"{list(SUFFIXES)}")
        return [p]
    splits = p / "dataset_dict.json"
    if splits.exists():  # datasets.DatasetDict.save_to_disk: one directory per split
        names = json.loads(splits.read_text()).get("splits", [])
        if "train" not in names:
            raise ValueError(f"data directory {str(p)!r} is a DatasetDict with splits {names} "
                             "and no 'train'; give the split's directory, e.g. "
                             f"{str(p / names[0]) if names else str(p)!r}")
        return data_files(p / "train")
    state = p / "state.json"
    if state.exists():  # datasets.save_to_disk: the listed arrow shards, in order
        files = [p / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    else:
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _READERS
                       and f.name not in ("dataset_info.json", "state.json"))
    if not files:
        raise ValueError(f"data directory {str(p)!r} holds no {list(SUFFIXES)} files")
    return files


def hub_cache_root() -> Path:
    """Where `huggingface_hub` keeps downloads: HF_HUB_CACHE, else HF_HOME/hub, else
    ~/.cache/huggingface/hub."""
    import os
    home = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    return Path(os.environ.get("HF_HUB_CACHE", str(Path(home) / "hub")))


def hub_cache_snapshot(name: str) -> Path | None:
    """The local hub cache's snapshot directory of dataset `name` ('org/dataset', optionally
    ':split'; what `huggingface_hub` downloads to HF_HUB_CACHE, default HF_HOME/hub or
    ~/.cache/huggingface/hub), or None. The revision `refs/main` names is used, else the
    newest snapshot."""
    parts = name.split(":", 1)[0].strip("/").split("/")
    if len(parts) != 2 or not all(parts) or Path(name).suffix in _READERS:
        return None
    repo = hub_cache_root() / f"datasets--{parts[0]}--{parts[1]}"
    ref = repo / "refs" / "main"
    if ref.is_file() and (repo / "snapshots" / ref.read_text().strip()).is_dir():
        return repo / "snapshots" / ref.read_text().strip()
    snapshots = sorted((repo / "snapshots").glob("*"), key=lambda d: d.stat().st_mtime) \
        if (repo / "snapshots").is_dir() else []
    return snapshots[-1] if snapshots else None


def _split_of(rel: Path) -> str:
    """The split a hub dataset file belongs to: its top directory (train/x.parquet), or its
    name before the shard counter (data/train-00000-of-00002.parquet, train.jsonl)."""
    if len(rel.parts) > 1 and rel.parts[0] != "data":
        return rel.parts[0]
    return re.split(r"-\d+-of-\d+", rel.name.split(".")[0])[0]


def _hub_files(snapshot: Path, name: str) -> list[Path]:
    """The data files of one split of a hub-cache snapshot: the split after ':' in `name`,
    else 'train', else the only split there is."""
    files = sorted(f for f in snapshot.rglob("*") if f.suffix in _READERS
                   and f.name not in ("dataset_info.json", "state.json") and f.exists())
    splits: dict[str, list[Path]] = {}
    for f in files:
        splits.setdefault(_split_of(f.relative_to(snapshot)), []).append(f)
    want = name.split(":", 1)[1] if ":" in name else "train"
    if want in splits:
        return splits[want]
    if ":" not in name and len(splits) == 1:
        return next(iter(splits.values()))
    raise ValueError(f"hub dataset {name!r} in the local hub cache ({snapshot}) has splits "
                     f"{sorted(splits) or 'none with data files'}; name one as "
                     f"{name.split(':', 1)[0]}:<split>")


def read_rows(path: str | Path, bad_line=None) -> Iterator[Row]:
    """Every row of a data source, in file order. bad_line(DataError): skip JSONL lines that
    are not JSON objects after calling it (data.skip_bad_rows), instead of raising."""
    for f in data_files(path):
        reader = _READERS[f.suffix]
        yield from (reader(f, bad_line) if reader is _jsonl else reader(f))
