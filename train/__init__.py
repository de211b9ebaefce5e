"""Training (SFT, DPO): data, objectives, the shared train loop. Installed as `qwen2_jax.train`.

step (the jitted train step and the SFT objective), trainer (the loop, checkpoints, resume),
sft and data (SFT), dpo and preference (DPO).
"""
