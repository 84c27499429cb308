"""hpc_rlhf: Ray-free post-training of LLMs on SLURM supercomputers."""

__version__ = "0.1.0"
