"""Control message of the bucketed broadcast: pure encode/decode, no communication.

Each bucket is preceded by one control message of fixed size `CONTROL_BYTES`, so a receiver
can post the receive for bucket k+1's control before it knows anything about bucket k+1, and
the sender never waits for a receiver between buckets (no per-bucket handshake):

    int64[5] = (MAGIC, payload bytes, checksum or -1, pickled-meta bytes, sender's bucket
    bytes), then the first CONTROL_BYTES - 40 bytes of the pickled `TensorMeta` tuple.

The sender's bucket size lets a receiver allocate each pooled buffer once at that capacity
(every later bucket fits it) instead of at the first bucket's exact size: on CPU a fresh
buffer costs first-touch page faults (measured 1.3 GB/s on the dev VM, slower than the wire).

A longer pickle (a bucket of thousands of tiny tensors) continues in one extra message of
exactly the missing length, sent right after the control. Meta bytes 0 ends the sync.
"""
from __future__ import annotations

import pickle

import torch

from hpc_rlhf.weight_sync.bucket import TensorMeta

CONTROL_BYTES = 16 * 1024
MAGIC = 0x5753594E43  # "WSYNC": catches a receiver out of step with its sender
_HEAD = 5 * 8


def encode_control(metas: tuple[TensorMeta, ...], nbytes: int, check: int, capacity: int
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(control [CONTROL_BYTES] uint8, overflow [n] uint8 or None) for one bucket of `nbytes`
    payload bytes; `capacity` is the sender's bucket size."""
    blob = pickle.dumps(metas)
    ctrl = torch.zeros(CONTROL_BYTES, dtype=torch.uint8)
    ctrl[:_HEAD].view(torch.int64).copy_(torch.tensor([MAGIC, nbytes, check, len(blob), capacity]))
    inline = min(len(blob), CONTROL_BYTES - _HEAD)
    ctrl[_HEAD:_HEAD + inline] = torch.frombuffer(bytearray(blob[:inline]), dtype=torch.uint8)
    rest = blob[inline:]
    return ctrl, (torch.frombuffer(bytearray(rest), dtype=torch.uint8) if rest else None)


def end_control() -> torch.Tensor:
    """The control message that ends a sync: [CONTROL_BYTES] uint8."""
    ctrl = torch.zeros(CONTROL_BYTES, dtype=torch.uint8)
    ctrl[:_HEAD].view(torch.int64).copy_(torch.tensor([MAGIC, 0, -1, 0, 0]))
    return ctrl


def decode_control(ctrl: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(payload bytes, checksum or -1, meta bytes, overflow bytes, sender's bucket bytes);
    meta bytes 0 ends the sync."""
    magic, nbytes, check, meta_len, capacity = (
        int(v) for v in ctrl[:_HEAD].cpu().view(torch.int64))
    if magic != MAGIC:
        raise RuntimeError(f"weight sync control message has magic {magic:#x}, expected "
                           f"{MAGIC:#x}: the receiver is out of step with its sender (both "
                           "must run the same hpc_rlhf version and one sync at a time)")
    return nbytes, check, meta_len, max(0, meta_len - (CONTROL_BYTES - _HEAD)), capacity


def decode_metas(ctrl: torch.Tensor, meta_len: int, overflow: torch.Tensor | None
                 ) -> tuple[TensorMeta, ...]:
    """The bucket's metas from its control message (and overflow message, if any)."""
    inline = min(meta_len, CONTROL_BYTES - _HEAD)
    blob = ctrl[_HEAD:_HEAD + inline].cpu().numpy().tobytes()
    if overflow is not None:
        blob += overflow.cpu().numpy().tobytes()
    return pickle.loads(blob)
