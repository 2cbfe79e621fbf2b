"""What the engine reports: a finished request (``Completion``), counters over its life (``EngineStats``) and a
run summary (``RunSummary``: throughput, prefill and decode rates, latencies, speculation, prefix hits, pages)."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass
class Completion:
    """A finished request: generated ids, why it stopped, and when things happened (``time.perf_counter``)."""

    id: int
    prompt: list[int]
    tokens: list[int]  # without the stop token
    finish_reason: str  # one of sampling.FINISH_REASONS
    cached_prompt_tokens: int  # prompt tokens attached from the prefix cache instead of recomputed
    submitted: float
    first_token: float  # when its first token reached the host (nan: none came)
    finished: float
    last_token: float = math.nan  # when its last token reached the host
    admitted: float = math.nan  # when it took a slot (nan: never)

    @property
    def latency(self) -> float:
        return self.finished - self.submitted

    @property
    def time_to_first_token(self) -> float:
        return self.first_token - self.submitted

    @property
    def queue_wait(self) -> float:
        """Seconds it waited for a free slot (part of its time to first token)."""
        return self.admitted - self.submitted

    @property
    def inter_token_latency(self) -> float:
        """Mean seconds between its tokens after the first (nan with fewer than two)."""
        if len(self.tokens) < 2:
            return math.nan
        return (self.last_token - self.first_token) / (len(self.tokens) - 1)


@dataclasses.dataclass
class EngineStats:
    """Counters since the engine was built (or ``Engine.reset_stats``). Seconds exclude compiling."""

    steps: int = 0  # mixed steps dispatched
    decode_steps: int = 0  # steps that carried no prompt token
    verify_steps: int = 0  # steps that verified drafts
    prefill_tokens: int = 0  # prompt tokens run through the model
    cached_prompt_tokens: int = 0  # prompt tokens attached from the prefix cache
    prefix_hits: int = 0  # requests that attached a cached prefix
    generated_tokens: int = 0  # tokens handed to requests
    decode_tokens: int = 0  # of those, tokens sampled by steps without prompt tokens
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    completed: int = 0
    prefill_s: float = 0.0  # seconds of steps that carried prompt tokens
    decode_s: float = 0.0  # seconds of steps that did not
    ttft_s: float = 0.0  # sum over completed requests with a first token
    ttft_n: int = 0
    queue_s: float = 0.0  # sum over those of the wait for a slot
    itl_s: float = 0.0  # sum over completed requests of their mean inter-token latency
    itl_n: int = 0
    first_submit: float = math.nan
    last_finish: float = math.nan
    compile_s: float = 0.0  # compile seconds inside [first_submit, last_finish]
    pages_in_use: int = 0  # paged: pages held (by slots and prefix-cache entries) after the last step
    peak_pages_in_use: int = 0
    num_pages: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    def completed_one(self, c: Completion, compiling=lambda start, end: 0.0) -> None:
        """Count ``c``; ``compiling(start, end)``: the seconds spent compiling between two of its times, left out of
        its latencies (a request's first step may wait seconds for a compile that later requests do not)."""
        self.completed += 1
        self.last_finish = c.finished
        if not math.isnan(c.first_token):
            self.ttft_s += c.time_to_first_token - compiling(c.submitted, c.first_token)
            waited = not math.isnan(c.admitted)
            self.queue_s += c.queue_wait - compiling(c.submitted, c.admitted) if waited else 0.0
            self.ttft_n += 1
        if not math.isnan(c.inter_token_latency):
            self.itl_s += c.inter_token_latency - compiling(c.first_token, c.last_token) / (len(c.tokens) - 1)
            self.itl_n += 1

    def summary(self) -> RunSummary:
        wall = max(self.last_finish - self.first_submit - self.compile_s, 1e-9) if self.completed else math.nan
        rate = lambda n, s: n / s if s > 0 else math.nan
        return RunSummary(
            requests=self.completed,
            wall_s=wall,
            compile_s=self.compile_s,
            generated_tokens=self.generated_tokens,
            tokens_per_s=rate(self.generated_tokens, wall),
            prefill_tokens=self.prefill_tokens,
            prefill_tokens_per_s=rate(self.prefill_tokens, self.prefill_s),
            decode_tokens_per_s=rate(self.decode_tokens, self.decode_s),
            mean_ttft_s=self.ttft_s / self.ttft_n if self.ttft_n else math.nan,
            mean_queue_s=self.queue_s / self.ttft_n if self.ttft_n else math.nan,
            mean_itl_s=self.itl_s / self.itl_n if self.itl_n else math.nan,
            acceptance_rate=self.acceptance_rate if self.drafted_tokens else math.nan,
            prefix_hits=self.prefix_hits,
            cached_prompt_tokens=self.cached_prompt_tokens,
            steps=self.steps,
            pages_in_use=self.pages_in_use,
            peak_pages_in_use=self.peak_pages_in_use,
            num_pages=self.num_pages,
        )


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """The figures of a run (``EngineStats.summary``). ``wall_s``: first submission to last completion; it, the
    rates and the latencies leave out ``compile_s``, the seconds spent compiling steps in between. Prefill tokens/s:
    prompt tokens over the seconds of steps that carried any; decode tokens/s: tokens sampled by the other steps
    over their seconds."""

    requests: int
    wall_s: float
    compile_s: float
    generated_tokens: int
    tokens_per_s: float
    prefill_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    mean_ttft_s: float
    mean_queue_s: float  # of the time to first token, the mean wait for a free slot
    mean_itl_s: float
    acceptance_rate: float  # nan without speculation
    prefix_hits: int
    cached_prompt_tokens: int
    steps: int
    pages_in_use: int
    peak_pages_in_use: int
    num_pages: int  # 0: not a paged cache

    def format(self) -> str:
        parts = [
            f"{self.requests} requests, {self.generated_tokens} tokens in {self.wall_s:.2f} s: "
            f"{self.tokens_per_s:.1f} tokens/s",
            f"compiling {self.compile_s:.2f} s, left out of every time and rate here",
            f"prefill {self.prefill_tokens} tokens at {self.prefill_tokens_per_s:.1f} tokens/s",
            f"decode {self.decode_tokens_per_s:.1f} tokens/s",
            f"time to first token {1e3 * self.mean_ttft_s:.1f} ms (waiting for a slot {1e3 * self.mean_queue_s:.1f}), "
            f"inter-token {1e3 * self.mean_itl_s:.2f} ms",
            f"{self.steps} steps",
        ]
        if not math.isnan(self.acceptance_rate):
            parts.append(f"drafts accepted {100 * self.acceptance_rate:.0f} %")
        if self.prefix_hits:
            parts.append(f"prefix hits {self.prefix_hits} ({self.cached_prompt_tokens} tokens)")
        if self.num_pages:
            parts.append(f"pages in use {self.pages_in_use} (peak {self.peak_pages_in_use}) of {self.num_pages}")
        return " | ".join(parts)
