"""The RL recipe (PPO, REINFORCE++, GRPO, Dr.GRPO, RLOO): loop.py (colocated) and
disaggregated.py read top to bottom over components.py (what they build), step.py (the compute
phases), collect.py / prompts.py / experience.py / micro.py / shared_prompt.py."""
