"""Serving: the continuous-batching engine (`engine`, `step`) and the OpenAI-compatible HTTP
API (`app`, `protocol`), installed as `qwen2_jax.serve`."""
