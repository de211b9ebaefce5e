"""The server's Prometheus metrics, in the text exposition format (no client library).

Names follow vLLM's where one exists (`vllm:num_requests_waiting` -> `qwen2_jax:num_requests_waiting`),
so dashboards carry over. The scheduler thread writes, the HTTP thread reads; every value is
a plain int/float updated atomically under the GIL, so no lock is needed.
"""

from __future__ import annotations

import bisect
import collections
import time

from qwen2_jax.serve.programs import xla_compilations

# Seconds; vLLM's buckets for time-to-first-token and inter-token latency.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0)
RATE_WINDOW = 10.0  # seconds over which tokens/s is measured


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            total += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        return [*out, f"{name}_sum {self.sum}", f"{name}_count {total}"]


class Metrics:
    """What /metrics reports: the queue, the slots, token counts and rates, latencies."""

    def __init__(self):
        self.waiting = 0
        self.running = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}
        self.time_to_first_token = Histogram(TTFT_BUCKETS)
        self.token_latency = Histogram(TOKEN_BUCKETS)
        self.programs = None  # the engine's ProgramStore
        self._samples: collections.deque = collections.deque()

    def tick(self) -> None:
        """Records the token count now (the scheduler calls it after each decode step)."""
        now = time.monotonic()
        self._samples.append((now, self.generation_tokens))
        while now - self._samples[0][0] > RATE_WINDOW:
            self._samples.popleft()

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last RATE_WINDOW seconds."""
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._samples) if now - t <= RATE_WINDOW]
        if len(recent) < 2:
            return 0.0
        return (recent[-1][1] - recent[0][1]) / (now - recent[0][0])

    def render(self, max_slots: int) -> str:
        p = "qwen2_jax:"
        lines = [
            f"# HELP {p}num_requests_waiting Requests queued for a free slot.",
            f"# TYPE {p}num_requests_waiting gauge", f"{p}num_requests_waiting {self.waiting}",
            f"# HELP {p}num_requests_running Slots holding a request (prefill or decode).",
            f"# TYPE {p}num_requests_running gauge", f"{p}num_requests_running {self.running}",
            f"# HELP {p}max_num_seqs Decode slots (--max-batch).",
            f"# TYPE {p}max_num_seqs gauge", f"{p}max_num_seqs {max_slots}",
            f"# HELP {p}prompt_tokens_total Prompt tokens prefilled.",
            f"# TYPE {p}prompt_tokens_total counter",
            f"{p}prompt_tokens_total {self.prompt_tokens}",
            f"# HELP {p}generation_tokens_total Tokens generated.",
            f"# TYPE {p}generation_tokens_total counter",
            f"{p}generation_tokens_total {self.generation_tokens}",
            f"# HELP {p}generation_tokens_per_second Tokens generated per second, last "
            f"{RATE_WINDOW:g} s.",
            f"# TYPE {p}generation_tokens_per_second gauge",
            f"{p}generation_tokens_per_second {self.tokens_per_second():.3f}",
            f"# HELP {p}request_success_total Finished requests by finish reason.",
            f"# TYPE {p}request_success_total counter",
            *(f'{p}request_success_total{{finished_reason="{reason}"}} {count}'
              for reason, count in sorted(self.finished.items())),
            f"# HELP {p}compiled_programs Engine programs compiled by this process (flat "
            "after warm-up).",
            f"# TYPE {p}compiled_programs gauge",
            f"{p}compiled_programs {getattr(self.programs, 'compiled', 0)}",
            f"# HELP {p}loaded_programs Engine programs read from --compile-cache.",
            f"# TYPE {p}loaded_programs gauge",
            f"{p}loaded_programs {getattr(self.programs, 'loaded', 0)}",
            f"# HELP {p}xla_compilations_total XLA compilations in this process, the "
            "engine's and any other.",
            f"# TYPE {p}xla_compilations_total counter",
            f"{p}xla_compilations_total {xla_compilations()}",
            f"# HELP {p}time_to_first_token_seconds From arrival to the first token.",
            f"# TYPE {p}time_to_first_token_seconds histogram",
            *self.time_to_first_token.lines(f"{p}time_to_first_token_seconds"),
            f"# HELP {p}inter_token_latency_seconds Between a request's successive tokens.",
            f"# TYPE {p}inter_token_latency_seconds histogram",
            *self.token_latency.lines(f"{p}inter_token_latency_seconds"),
        ]
        return "\n".join(lines) + "\n"
