"""Training engine: DeepSpeed strategy, logprob utilities, losses and trainers."""
