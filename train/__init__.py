"""Training (SFT, DPO): data, losses, the train loop. Installed as `qwen2_jax.train`.

Empty until the SFT issue lands; the model already takes the segment ids packing needs.
"""
