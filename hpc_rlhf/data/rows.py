"""Field access on raw rows with errors that name the file, row and field, and the counting
of rows that are skipped (bad or over-long) when the config says so."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


class DataError(ValueError):
    """A malformed row: names the file, row, field, what is wrong and how to fix it."""

    def __init__(self, file: str | None, row: int | None, field_name: str | None, problem: str,
                 fix: str = "fix the row or set data.skip_bad_rows=true to skip and count it"):
        self.file, self.row, self.field, self.problem = file, row, field_name, problem
        where = f"{file or '<data>'}"
        if row is not None:  # JSONL: the line an editor shows; tables: the 0-based row index
            where += f" line {row + 1}" if str(file).endswith(".jsonl") else f" row {row}"
        if field_name is not None:
            where += f" field {field_name!r}"
        super().__init__(f"{where}: {problem}; {fix}")


@dataclass
class DataStats:
    """How many rows were read, kept, and skipped for which reason (reported by trainers)."""
    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)   # reason -> count

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def summary(self) -> str:
        parts = [f"read {self.read}", f"kept {self.kept}"]
        parts += [f"skipped {n} ({reason})" for reason, n in sorted(self.skipped.items())]
        return ", ".join(parts)


def _where(row) -> tuple[str, int]:
    return row.file, row.index


def get_field(row, key: str, *, required: bool = True):
    """row.data[key]; a missing key is a DataError listing the keys the row has."""
    if key in row.data and row.data[key] is not None:
        return row.data[key]
    if not required:
        return None
    raise DataError(*_where(row), key, f"is missing (row has keys {sorted(row.data)})",
                    "set the data.*_key option that names this field, fix the row, or set "
                    "data.skip_bad_rows=true")


def get_text(row, key: str) -> str:
    """A non-empty string field."""
    value = get_field(row, key)
    if not isinstance(value, str):
        raise DataError(*_where(row), key, f"is a {type(value).__name__}, expected a string")
    if not value.strip():
        raise DataError(*_where(row), key, "is empty")
    return value


def get_messages(row, key: str, value=None) -> list[dict]:
    """A chat conversation: a non-empty list of {'role': str, 'content': str} dicts."""
    value = get_field(row, key) if value is None else value
    if not isinstance(value, list) or not value:
        raise DataError(*_where(row), key, f"is a {type(value).__name__}, expected a non-empty "
                        "list of {'role', 'content'} messages")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise DataError(*_where(row), f"{key}[{i}]", f"is {m!r}, expected a dict with string "
                            "'role' and 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def get_text_or_messages(row, key: str):
    """A string or a message list (chat datasets store either)."""
    value = get_field(row, key)
    if isinstance(value, str):
        return get_text(row, key)
    return get_messages(row, key, value)


def get_bool(row, key: str) -> bool:
    """A binary label: bool, 0/1, or the strings true/false/yes/no/+/-."""
    value = get_field(row, key)
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _BOOL_STRINGS:
        return _BOOL_STRINGS[value.strip().lower()]
    raise DataError(*_where(row), key, f"is {value!r}, expected a binary label "
                    "(true/false, 0/1, '+'/'-')")


_BOOL_STRINGS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False,
                 "+": True, "-": False}


def get_float(row, key: str) -> float:
    value = get_field(row, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(*_where(row), key, f"is {value!r}, expected a number")
    return float(value)
