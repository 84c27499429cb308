"""The training engine: the DeepSpeed strategy (ZeRO / AutoTP / offload), per-token logprobs,
the MoE aux loss, RingAttention in training forwards, DeepSpeed's op cache, and the colocated
memory schedule (offload / reload around rollout)."""
