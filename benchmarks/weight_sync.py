"""Weight-sync throughput: bucketed broadcast vs one flat broadcast of the same bytes, same run.

    python benchmarks/weight_sync.py                        # 2 procs, gloo, ~128 MB model
    python benchmarks/weight_sync.py --mb 512 --bucket-mb 64 --receivers 2

Spawns 1 sender + R receivers on one standalone gloo group (NCCL: --backend nccl, one GPU per
process). The "model" is a list of float32/bf16 tensors shaped like a small LLM's (embedding,
per-layer attention/MLP matrices, norms). Each round times, from a barrier to a barrier (so
until every receiver is done):

  flat          one broadcast of one preallocated buffer already holding the model's bytes
                (the wire's upper bound: no packing, no unpacking)
  staged        `BroadcastSender.send` of tensors already produced into the sender's staging
                ring (`sender.alloc`, as the trainer's gather does), so buckets leave from
                where the weights are: the protocol's cost over `flat` (control messages, one
                broadcast per bucket), no copy. Its producer copy is untimed, like the copy that
                put the model's bytes into `flat`'s buffer.
  bucketed      `send` of separate tensors: each is packed (copied) into a bucket first
  trainer_old   what a trainer sync cost before staging: clone each tensor out of the model (a
                ZeRO-3 gather's copy) -> pack -> send
  trainer_new   what it costs now: copy each tensor into `sender.alloc` -> send (one copy,
                overlapped with the previous bucket on the wire)
  flat_e2e      flat + receivers copy each tensor out of the flat buffer into their model
  bucketed_e2e  bucketed + receivers copy each received tensor into their model
  per_tensor    one broadcast per tensor (what bucketing replaces)

and prints bytes/s (model bytes / median time) and the ratios to flat: "transport" = staged
(goal >= 0.8), "packing" = bucketed, "end-to-end" = bucketed_e2e / flat_e2e, plus the speed-up
trainer_old / trainer_new. On 2 CPU cores a copy competes with both socket ends; on GPU the
copies are device-to-device and the wire is NCCL.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import time
from datetime import timedelta

import torch


def fake_model(total_mb: int, hidden: int = 1024) -> list[tuple[str, torch.Tensor]]:
    """LLM-shaped tensors until total_mb is reached (embedding first, then layers)."""
    tensors = [("model.embed_tokens.weight", torch.randn(8192, hidden))]
    size = lambda: sum(t.numel() * t.element_size() for _, t in tensors)  # noqa: E731
    layer = 0
    while size() < total_mb * 2**20:
        p = f"model.layers.{layer}."
        tensors += [(p + "input_layernorm.weight", torch.ones(hidden)),
                    (p + "self_attn.q_proj.weight", torch.randn(hidden, hidden)),
                    (p + "self_attn.k_proj.weight", torch.randn(hidden // 4, hidden)),
                    (p + "self_attn.v_proj.weight", torch.randn(hidden // 4, hidden)),
                    (p + "self_attn.o_proj.weight", torch.randn(hidden, hidden)),
                    (p + "mlp.gate_up.weight", torch.randn(2 * hidden, hidden).bfloat16()),
                    (p + "mlp.down_proj.weight", torch.randn(hidden, 2 * hidden).bfloat16())]
        layer += 1
    return tensors


def _group(backend, rank, world, port):
    import torch.distributed as dist
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timedelta(seconds=120))
    prefixed = dist.PrefixStore("bench", store)
    if backend == "nccl":
        torch.cuda.set_device(rank)
        return dist.ProcessGroupNCCL(prefixed, rank, world), torch.device("cuda", rank)
    return dist.ProcessGroupGloo(prefixed, rank, world, timedelta(seconds=120)), torch.device("cpu")


def _worker(rank, world, port, args, queue):
    from hpc_rlhf.weight_sync import BroadcastReceiver, BroadcastSender
    torch.manual_seed(0)
    group, device = _group(args.backend, rank, world, port)
    tensors = [(n, t.to(device)) for n, t in fake_model(args.mb)]
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    # the flat baseline sends real bytes: an untouched torch.empty would be read from the
    # kernel's shared zero page (always in cache) and flatter the baseline
    flat = torch.cat([t.reshape(-1).view(torch.uint8) for _, t in tensors])         # [total]
    views, offset = {}, 0  # the receiver's model: tensors that receiving loads into
    for name, t in tensors:
        views[name] = flat[offset:offset + t.numel() * t.element_size()].view(t.dtype).view(
            t.shape)
        offset += t.numel() * t.element_size()
    model = {n: t.clone() for n, t in tensors}
    barrier = torch.zeros(1, device=device)
    times = {k: [] for k in ("flat", "staged", "bucketed", "trainer_old", "trainer_new",
                             "flat_e2e", "bucketed_e2e", "per_tensor")}

    def timed(key, fn):
        group.broadcast(barrier, 0).wait()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        group.broadcast(barrier, 0).wait()  # done when every receiver is done
        times[key].append(time.perf_counter() - start)

    # persistent, as in training: buffers are reused from one sync to the next
    bucket = args.bucket_mb * 2**20
    sender = BroadcastSender(group, 0, bucket_bytes=bucket, device=device, verify=args.verify)
    # `staged` pre-stages the whole model (untimed), so its ring must hold it all at once
    regions = max(2, -(-total // bucket) + 1)
    stager = BroadcastSender(group, 0, bucket_bytes=bucket, device=device, verify=args.verify,
                             regions=regions)
    receiver = BroadcastReceiver(group, 0, device=device)

    def load(named):  # what an engine's load_weights does: copy each tensor into its param
        for name, t in named:
            model[name].copy_(t)

    def flat_sync(e2e):
        group.broadcast(flat, 0).wait()
        if e2e and rank != 0:
            load(views.items())

    def bucketed(e2e):
        if rank == 0:
            sender.send(iter(tensors))
        elif e2e:
            load(receiver.receive())
        else:
            for _ in receiver.receive():
                pass

    def receive_only():
        for _ in receiver.receive():
            pass

    def trainer(new):
        if rank != 0:
            return receive_only()
        if new:
            sender.send((n, _into(sender.alloc(tuple(t.shape), t.dtype), t)) for n, t in tensors)
        else:
            sender.send((n, t.clone()) for n, t in tensors)

    def per_tensor():
        for _, t in tensors:
            group.broadcast(t if rank == 0 else torch.empty_like(t), 0).wait()

    for it in range(args.iters + 1):  # first round is warm-up
        timed("flat", lambda: flat_sync(False))
        if rank == 0:  # the producer's copy, outside the timed region
            staged_items = list(_stage_all(stager, tensors))
        timed("staged", lambda: stager.send(iter(staged_items)) if rank == 0 else receive_only())
        timed("bucketed", lambda: bucketed(False))
        timed("trainer_old", lambda: trainer(False))
        timed("trainer_new", lambda: trainer(True))
        timed("flat_e2e", lambda: flat_sync(True))
        timed("bucketed_e2e", lambda: bucketed(True))
        if not args.skip_per_tensor:
            timed("per_tensor", per_tensor)
    if rank == 0:
        queue.put((total, len(tensors), {k: v[1:] for k, v in times.items() if v}))


def _into(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    from hpc_rlhf.weight_sync.bucket import _as_bytes, copy_bytes
    copy_bytes(_as_bytes(dst), _as_bytes(src))  # one single-threaded copy, as packing does
    return dst


def _stage_all(sender, tensors):
    return [(n, _into(sender.alloc(tuple(t.shape), t.dtype), t)) for n, t in tensors]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=512, help="model size in MiB (>= 100)")
    ap.add_argument("--bucket-mb", type=int, default=256,
                    help="bucket size (default: rollout.weight_sync_bucket_mb's default)")
    ap.add_argument("--receivers", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    ap.add_argument("--verify", action="store_true", help="per-bucket checksums on")
    ap.add_argument("--skip-per-tensor", action="store_true")
    args = ap.parse_args(argv)
    world = args.receivers + 1
    load0 = os.getloadavg()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    total, count, times = queue.get(timeout=1800)
    for p in procs:
        p.join(timeout=60)
    print(f"backend={args.backend} receivers={args.receivers} model={total / 2**20:.0f} MiB "
          f"({count} tensors) bucket={args.bucket_mb} MiB verify={args.verify} "
          f"iters={args.iters}")
    rate = {k: total / statistics.median(v) for k, v in times.items()}
    for k, r in rate.items():
        spread = f"{min(times[k]):.3f}-{max(times[k]):.3f}"
        print(f"  {k:13s} {r / 1e9:7.3f} GB/s  (median {statistics.median(times[k]):.3f} s, "
              f"range {spread})")
    best = {k: min(v) for k, v in times.items()}
    for label, (b, f) in {"transport": ("staged", "flat"), "packing": ("bucketed", "flat"),
                          "end-to-end": ("bucketed_e2e", "flat_e2e")}.items():
        goal = "  (goal >= 0.8)" if label == "transport" else ""
        print(f"ratio {b}/{f} {label:10s} = {rate[b] / rate[f]:.3f} of medians, "
              f"{best[f] / best[b]:.3f} of best times{goal}")
    print(f"trainer sync speed-up (old clone+pack / new copy into the ring) = "
          f"{statistics.median(times['trainer_old']) / statistics.median(times['trainer_new']):.3f}"
          f" of medians; trainer_new/flat = {rate['trainer_new'] / rate['flat']:.3f}")
    print(f"load average before {load0[0]:.2f}, after {os.getloadavg()[0]:.2f} "
          f"({os.cpu_count()} cpus)")

if __name__ == "__main__":
    main()
