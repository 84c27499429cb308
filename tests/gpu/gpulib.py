"""Helpers of the gpu tests: each test adds one row to the table scripts/gpu_check.sh prints."""
from __future__ import annotations

import json
import os


def record(check: str, result: str, detail: str = "") -> None:
    """Append a row (check, result, detail) to $HPC_RLHF_GPU_TABLE, if set; print it too."""
    row = {"check": check, "result": result, "detail": detail}
    print(f"[gpu] {check}: {result} {detail}", flush=True)
    path = os.environ.get("HPC_RLHF_GPU_TABLE")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
