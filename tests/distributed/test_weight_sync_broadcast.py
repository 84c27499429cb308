"""Bucketed weight broadcast over a standalone gloo group spanning separate processes.

1. three processes, pure torch: one sender, two receivers (like two vLLM TP slices), five
   syncs through the same pipelined sender/receiver objects: mixed dtypes, tensors larger
   than a bucket and exactly one bucket (sent without packing), 600 tensors in one bucket
   (control message overflow), checksums on and off, a source that overwrites each tensor as
   soon as it is resumed (ZeRO-3 release) and stalls now and then, one fast receiver and one
   slow receiver holding views across buckets; every receiver gets every tensor bit-exact.
2. two processes, sender (HF model, perturbed = "trained") and receiver (a real VLLMEngine):
   after the sync the engine's logprobs equal the trained model's (float32 tolerance 1e-4),
   checked by the parent process with its own recompute.
Each process makes only a standalone ProcessGroupGloo (no default world), as in disaggregated
mode; vLLM's uniprocess executor then makes its own one-rank default world undisturbed.
"""
import multiprocessing as mp
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch

pytestmark = pytest.mark.distributed

TIMEOUT_S = 150
LOGPROB_TOL = 1e-4
PROMPTS = [[1, 4, 40, 41, 42], [1, 4, 50], [1, 4, 60, 61, 62, 63]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sync_group(rank: int, world: int, port: int):
    import torch.distributed as dist
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timedelta(seconds=60))
    return dist.ProcessGroupGloo(dist.PrefixStore("weight_sync", store), rank, world,
                                 timedelta(seconds=60))


def put(queue, rank, kind, payload):
    """Send results as bytes: tensors through mp.Queue travel as shared-memory fds, which break
    when the child exits before the parent unpickles them."""
    import io
    buf = io.BytesIO()
    torch.save(payload, buf)
    queue.put((rank, kind, buf.getvalue()))


def mixed_tensors(seed=11):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(12):
        dtype = (torch.float32, torch.bfloat16, torch.float16, torch.int64)[i % 4]
        t = torch.randn(37 + i, 5, generator=g) * 10
        out.append((f"layer{i}.w", t.to(dtype)))
    out.append(("huge", torch.randn(3000, generator=g)))   # bigger than a bucket
    return out


def scenario_tensors(name):
    """Deterministic per scenario, so sender, receivers and the parent rebuild them alike."""
    if name == "mixed_2k":
        return mixed_tensors()
    if name in ("big_64k", "big_64k_again"):  # a tensor 2.4x the bucket, dtypes mixed
        out = mixed_tensors(seed=12 if name == "big_64k" else 13)
        return out[:5] + [("big", torch.randn(40_000, generator=torch.Generator().manual_seed(
            len(name))))] + out[5:]
    if name == "exact_4k":  # tensors of exactly one bucket (sent unpacked) between small ones
        g = torch.Generator().manual_seed(14)
        return [(f"t{i}", torch.randn(1024 if i % 2 else 7, generator=g)) for i in range(9)]
    if name == "tiny_many":  # 600 metas in one bucket: the control message overflows
        return [(f"tiny{i}", torch.full((4,), float(i))) for i in range(600)]
    raise KeyError(name)


# (name, bucket bytes, verify); one sender and one receiver object per rank serve them all,
# so later syncs reuse the buffers of earlier ones
SCENARIOS = [("mixed_2k", 2048, True), ("big_64k", 65536, False), ("exact_4k", 4096, True),
             ("tiny_many", 65536, False), ("big_64k_again", 65536, True)]


def released_after_yield(tensors, pause_s):
    """Like a ZeRO-3 gather: each tensor is overwritten as soon as the consumer resumes us,
    and gathering is slow now and then (the receiver must then wait for a control message)."""
    for i, (name, t) in enumerate(tensors):
        if i % 3 == 0:
            time.sleep(pause_s)
        t = t.clone()
        yield name, t
        t.fill_(-1)


def _pure_worker(rank, world, port, queue):
    try:
        from hpc_rlhf.weight_sync import BroadcastReceiver, BroadcastSender
        group = sync_group(rank, world, port)
        if rank == 0:
            stats = []
            for name, bucket_bytes, verify in SCENARIOS:
                sender = BroadcastSender(group, 0, bucket_bytes=bucket_bytes, verify=verify)
                st = sender.send(released_after_yield(scenario_tensors(name), 0.005))
                stats.append((st.tensors, st.buckets, st.bytes))
            put(queue, rank, "stats", stats)
        else:
            receiver, got = BroadcastReceiver(group, src=0), []
            for name, _, _ in SCENARIOS:
                if rank == 1:  # fast consumer, copies at once
                    got.append([(n, t.clone()) for n, t in receiver.receive()])
                else:  # slow consumer that holds views across buckets (vLLM layer-wise)
                    views = []
                    for n, t in receiver.receive():
                        time.sleep(0.0005)
                        views.append((n, t))
                    got.append([(n, t.clone()) for n, t in views])
            put(queue, rank, "got", got)
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))


def _vllm_worker(rank, world, port, model_path, queue):
    try:
        from hpc_rlhf.rollout import SamplingConfig
        from hpc_rlhf.weight_sync import broadcast_weights, sync_from_broadcast
        if rank == 0:
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
            _perturb(model)
            group = sync_group(rank, world, port)
            stats = broadcast_weights(model.named_parameters(), group, src=0,
                                      bucket_bytes=256 * 1024, verify=True)
            put(queue, rank, "stats", (stats.tensors, stats.buckets, stats.bytes))
        else:
            from hpc_rlhf.rollout.vllm_engine import VLLMEngine
            engine = VLLMEngine(model_path, dtype="float32", max_model_len=128, seed=0,
                                enforce_eager=True)
            sampling = SamplingConfig(n=2, max_new_tokens=8, temperature=0.8, seed=0)
            before = engine.generate(PROMPTS, sampling)
            group = sync_group(rank, world, port)
            sync_from_broadcast(engine, group, src=0)
            after = engine.generate(PROMPTS, sampling)
            put(queue, rank, "rollouts", (before, after))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))


def _perturb(model, seed=3, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def run_procs(target, world, *args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world):
            rank, kind, payload = queue.get(timeout=TIMEOUT_S)
            if kind == "error":
                raise AssertionError(f"rank {rank} failed:\n{payload}")
            import io
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return results


def test_pipelined_broadcast_reaches_every_receiver_bit_exact():
    results = run_procs(_pure_worker, 3)
    for k, (name, bucket_bytes, _) in enumerate(SCENARIOS):
        want = scenario_tensors(name)
        tensors, buckets, nbytes = results[0][k]
        assert tensors == len(want), name
        assert nbytes >= sum(t.numel() * t.element_size() for _, t in want), name
        if name == "mixed_2k":
            assert buckets > 3
        for rank in (1, 2):
            got = results[rank][k]
            assert [n for n, _ in got] == [n for n, _ in want], (rank, name)
            for (tname, a), (_, b) in zip(want, got):
                assert a.dtype == b.dtype and a.shape == b.shape, (rank, name, tname)
                assert torch.equal(a, b), (rank, name, tname)


@pytest.mark.vllm
def test_vllm_receiver_matches_trained_sender(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from hpc_rlhf.models.tiny import ensure_tiny_model
    from hpc_rlhf.rollout import logprob_gap
    path = ensure_tiny_model(tmp_path_factory.mktemp("models"))
    results = run_procs(_vllm_worker, 2, str(path))
    assert results[0][0] == len(list(AutoModelForCausalLM.from_pretrained(path).parameters()))
    before, after = results[1]
    trained = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    _perturb(trained)

    def recompute(r):
        ids = torch.tensor([r.prompt_ids + r.response_ids])
        with torch.no_grad():
            logits = trained(input_ids=ids).logits[0].double() / 0.8        # [T, v]
        lp = torch.log_softmax(logits[len(r.prompt_ids) - 1:-1], dim=-1)
        return lp.gather(-1, torch.tensor(r.response_ids)[:, None]).squeeze(-1).float()

    stale = logprob_gap(before, [recompute(r) for r in before])
    fresh = logprob_gap(after, [recompute(r) for r in after])
    print("broadcast sync: gap before", stale, "after", fresh)
    assert stale["logprob_gap_max"] > 0.05
    assert fresh["logprob_gap_max"] < LOGPROB_TOL
