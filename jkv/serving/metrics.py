"""What the engine reports: a finished request (``Completion``) and counters over its life (``EngineStats``)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Completion:
    """A finished request: generated ids, why it stopped, and when things happened (``time.perf_counter``)."""

    id: int
    prompt: list[int]
    tokens: list[int]  # without the stop token
    finish_reason: str  # one of sampling.FINISH_REASONS
    cached_prompt_tokens: int  # prompt tokens restored from the prefix cache instead of recomputed
    submitted: float
    first_token: float
    finished: float

    @property
    def latency(self) -> float:
        return self.finished - self.submitted

    @property
    def time_to_first_token(self) -> float:
        return self.first_token - self.submitted


@dataclasses.dataclass
class EngineStats:
    prefill_tokens: int = 0  # prompt tokens run through the model
    cached_prompt_tokens: int = 0  # prompt tokens restored from the prefix cache
    decode_steps: int = 0
    verify_steps: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    prefill_s: float = 0.0  # seconds of admission (prefill up to the first token read), compiles excluded

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0
