"""Hugging Face safetensors <-> our parameter pytree: the name table and the file readers.

Installed as `qwen2_jax.convert`.
"""
