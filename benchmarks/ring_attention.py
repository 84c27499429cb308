"""Ring attention vs full attention on one rank: time and peak memory per rank.

    python benchmarks/ring_attention.py                 # seq 8192, 2 ranks, CPU/gloo, ~1 min
    python benchmarks/ring_attention.py --seq 16384 --world 4 --balanced

Every configuration runs in fresh processes with one intra-op thread per rank (so the ring's
ranks and the single rank get the same compute each) and does one untimed warm-up on a short
sequence, then forward + backward of causal attention over one packed row.

Peak memory: ru_maxrss (the process's resident-set high-water mark) after the timed step minus
the mark before it (inputs already allocated, warm-up done). torch CPU allocations are not
visible to tracemalloc, and maxrss cannot be reset, hence a fresh process per run. It measures
the attention's own transient memory (score tiles, gradients, ring buffers), which is what
ring attention divides; inputs are listed separately. Wall time includes waiting for ring
neighbours; cpu time (process_time) does not, but it is the fairer number on a shared machine
where other jobs take cores (the wall-time ratio then mostly measures the other jobs).

Rows: "full, 1 rank" is the same pure-torch kernel over the whole sequence (ring of one);
"sdpa, 1 rank" is torch's fused scaled_dot_product_attention for context. Ratios are ring
(slowest / largest rank) over full.
"""
from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F

from hpc_rlhf.ring_attn import RingLayout, ring_attention, run_local_ring


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _inputs(layout: RingLayout, rank: int, heads: int, kv_heads: int, dim: int, dtype):
    torch.manual_seed(rank)
    L = layout.local_len
    q = torch.randn(L, heads, dim, dtype=dtype, requires_grad=True)
    k = torch.randn(L, kv_heads, dim, dtype=dtype, requires_grad=True)
    v = torch.randn(L, kv_heads, dim, dtype=dtype, requires_grad=True)
    return q, k, v


def _step(kind, layout, group, q, k, v):
    if kind == "sdpa":
        g = q.shape[1] // k.shape[1]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.repeat_interleave(g, 1).transpose(0, 1),
            v.repeat_interleave(g, 1).transpose(0, 1), is_causal=True,
        ).transpose(0, 1)
    else:
        out = ring_attention(q, k, v, layout, group)
    out.backward(torch.ones_like(out))
    return out


def _run(rank, world, kind, seq, heads, kv_heads, dim, balanced, dtype_name):
    dtype = getattr(torch, dtype_name)
    small = RingLayout((0, 256 * world), world, balanced)  # warm-up: lazy imports, allocator
    _step(kind, small, None, *_inputs(small, rank, heads, kv_heads, dim, dtype))

    layout = RingLayout((0, seq), world, balanced)
    q, k, v = _inputs(layout, rank, heads, kv_heads, dim, dtype)
    input_mib = sum(t.numel() * t.element_size() for t in (q, k, v)) * 2 / 2**20  # + grads
    before = _maxrss_mib()
    if world > 1:
        torch.distributed.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    _step(kind, layout, None, q, k, v)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu": cpu, "peak_mib": _maxrss_mib() - before, "input_mib": input_mib}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=8192, help="tokens in the packed row")
    p.add_argument("--world", type=int, default=2, help="ranks in the ring")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    p.add_argument("--balanced", action="store_true", help="zigzag layout (equal work per rank)")
    p.add_argument("--skip-sdpa", action="store_true")
    a = p.parse_args(argv)
    common = (a.seq, a.heads, a.kv_heads, a.head_dim, a.balanced, a.dtype)

    rows = {}
    rows["full, 1 rank"] = run_local_ring(_run, 1, ("ring",) + common, timeout_s=900)
    if not a.skip_sdpa:
        rows["sdpa, 1 rank"] = run_local_ring(_run, 1, ("sdpa",) + common, timeout_s=900)
    ring_name = f"ring, {a.world} ranks" + (" (balanced)" if a.balanced else "")
    rows[ring_name] = run_local_ring(_run, a.world, ("ring",) + common, timeout_s=900)

    print(f"\nseq={a.seq} heads={a.heads} kv_heads={a.kv_heads} head_dim={a.head_dim} "
          f"dtype={a.dtype}, forward+backward, 1 thread per rank")
    print(f"{'config':28s} {'rank':>4s} {'wall s':>7s} {'cpu s':>7s} {'peak MiB':>9s} "
          f"{'inputs+grads MiB':>17s}")
    for name, per_rank in rows.items():
        for r, res in enumerate(per_rank):
            print(f"{name:28s} {r:4d} {res['seconds']:7.2f} {res['cpu']:7.2f} {res['peak_mib']:9.1f} "
                  f"{res['input_mib']:17.1f}")
    full, ring = rows["full, 1 rank"][0], rows[ring_name]
    t_ratio = max(r["seconds"] for r in ring) / full["seconds"]
    c_ratio = max(r["cpu"] for r in ring) / full["cpu"]
    m_ratio = max(r["peak_mib"] for r in ring) / max(full["peak_mib"], 1e-9)
    ideal_time = 1 / a.world if a.balanced else (2 * a.world - 1) / a.world**2
    print(f"\nratio ring/full (slowest / largest rank): wall time {t_ratio:.2f}, cpu time "
          f"{c_ratio:.2f} (ideal {ideal_time:.2f}), peak memory {m_ratio:.2f} (ideal ~{1 / a.world:.2f})")
    if "sdpa, 1 rank" in rows:
        s = rows["sdpa, 1 rank"][0]
        print(f"ratio ring/sdpa: wall time {max(r['seconds'] for r in ring) / s['seconds']:.2f}, "
              f"peak memory {max(r['peak_mib'] for r in ring) / max(s['peak_mib'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
