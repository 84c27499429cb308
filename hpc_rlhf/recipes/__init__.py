"""The recipes: loops that read top to bottom over runtime and the parts. rl/ (PPO-family,
colocated and disaggregated), sft, rm, prm, dpo, kto, kd, csft, rejection_sampling,
iterative_dpo; common.py holds what the supervised recipes share (model loading, strategy)."""
