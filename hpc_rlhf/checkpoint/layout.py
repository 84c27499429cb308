"""Where checkpoints are and which one a run resumes from: pure pathlib (no torch), so the
launcher can check a run directory before anything is queued. store.py writes and reads them."""
from __future__ import annotations

import os
import re
from pathlib import Path

STEP_DIR = re.compile(r"^step_(\d+)$")
MARKER = "COMPLETE"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root` as (step, path), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = STEP_DIR.match(child.name)
        if m and (child / MARKER).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def branch_source(resume_from: str | os.PathLike) -> tuple[Path, int]:
    """checkpoint.resume_from -> (checkpoints root, step). It names one complete checkpoint
    (`.../checkpoints/step_00000020`), a checkpoints directory or a run directory (then its
    newest complete checkpoint). Raises ValueError saying what was found instead."""
    path = Path(resume_from).expanduser()
    m = STEP_DIR.match(path.name)
    if m:
        if not (path / MARKER).is_file():
            raise ValueError(f"checkpoint.resume_from={resume_from}: not a complete checkpoint "
                             f"(no {MARKER} file; complete ones there: "
                             f"{[s for s, _ in list_checkpoints(path.parent)]})")
        return path.parent, int(m.group(1))
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = list_checkpoints(root)
    if not found:
        what = "does not exist" if not path.exists() else "holds no complete checkpoint"
        raise ValueError(f"checkpoint.resume_from={resume_from} {what}; give a run directory, "
                         "its checkpoints/ directory or one checkpoints/step_N directory")
    return root, found[-1][0]


def resume_source(ckpt_dir: str | os.PathLike, resume_from: str = ""
                  ) -> tuple[Path, int | None] | None:
    """Where a run starts from: (root, None) for its own newest complete checkpoint; else, with
    checkpoint.resume_from, (root, step) of that one (a branch); else None (a fresh start)."""
    if latest_checkpoint(ckpt_dir) is not None:
        return Path(ckpt_dir), None
    if not resume_from:
        return None
    return branch_source(resume_from)


def describe_start(source: tuple[Path, int | None], step: int) -> str:
    """The line that says where a run started from (its own checkpoint, or a branch)."""
    ckpts, branched = source
    if branched is None:
        return f"resumed from step {step} ({ckpts})"
    return (f"branched from {Path(ckpts) / step_dir_name(step)} (checkpoint.resume_from) at "
            f"step {step}")
