"""A single-request / batch front over the engine: ``Generator``, ``generate_text`` and a ``Timing`` summary.

A ``Generator`` holds an ``Engine`` with one slot per sequence of its batch; ``generate`` submits the prompts,
runs the engine's loop and reports the timings of its phases. Sequence ``i`` of a call with ``seed=s`` is the
engine request with ``seed=s + i``, so it gets the same tokens as that request sent to any engine.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from jkv.attention import resolve_impl
from jkv.caches.registry import whole_pages
from jkv.models import llama
from jkv.serving import steps
from jkv.serving.engine import Engine, EngineOptions
from jkv.serving.sampling import SamplingParams
from jkv.serving.steps import cache_kinds


@dataclasses.dataclass
class Timing:
    """Seconds per phase. ``decode_steps`` counts batched steps; each yields one token per sequence."""

    load_s: float = 0.0
    compile_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0
    decode_steps: int = 0
    batch: int = 1

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.decode_s / self.decode_steps if self.decode_steps else float("nan")

    @property
    def tokens_per_s(self) -> float:
        """Decode tokens per second over the whole batch."""
        return self.batch * self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")

    def summary(self) -> str:
        head = f"load {self.load_s:.2f} s | compile {self.compile_s:.2f} s"
        if not self.decode_steps and not self.prefill_s:  # max_new_tokens=0: nothing ran
            return f"{head} | nothing generated (no new tokens asked for)"
        decode = f"decode {self.decode_steps} steps x batch {self.batch}"
        if self.decode_steps:
            decode += f": {self.ms_per_step:.2f} ms/step, {self.tokens_per_s:.1f} tokens/s"
        return f"{head} | prefill {self.prompt_tokens} tokens {1e3 * self.prefill_s:.1f} ms | {decode}"


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens of each sequence, stop token excluded
    finish_reasons: list[str]  # "stop" (a stop token came) or "length" (max_new_tokens reached)
    timing: Timing


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


class Generator:
    """Generation for one model, one batch size and one cache capacity, over an ``Engine`` of ``batch`` slots.

    The engine's mixed step compiles once per token bucket, with the cache donated; ``compile_s`` in each result
    counts the compiles that call triggered. ``cache``: ``"default"`` (``"f32"`` for float32 weights, else
    ``"bf16"``) or a name of ``cache_kinds()``. ``max_batch_tokens`` and ``buckets``: the engine's tokens per
    step and step shapes (``EngineOptions``).
    """

    def __init__(
        self,
        config: llama.LlamaConfig,
        params: llama.LlamaParams,
        *,
        max_len: int = 2048,
        batch: int = 1,
        cache: str = "default",
        impl: str | None = None,
        cache_options=(),
        options: llama.LlamaOptions | None = None,
        max_batch_tokens: int | None = None,
        buckets: tuple[int, ...] | None = None,
    ):
        llama.check_params(params, config)
        if not _is_int(max_len) or max_len < 2:
            raise ValueError(f"max_len must be an int >= 2, got {max_len!r}")
        if max_len > config.max_position:
            raise ValueError(f"{max_len=} exceeds the model's context length max_position={config.max_position}")
        if not _is_int(batch) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        if cache == "default":
            cache = "f32" if params.dtype == jnp.float32 else "bf16"
        if impl is not None and options is not None:
            raise ValueError(f"give impl={impl!r} or options={options!r}, not both")
        resolve_impl(impl)  # a bad name fails here; None stays None, as the engine keeps it (one compiled step)
        model = llama.LlamaOptions(impl=impl) if options is None else options
        engine_options = EngineOptions(
            int(batch),
            int(max_len),
            cache,
            cache_options=cache_options,
            model=model,
            max_batch_tokens=max_batch_tokens,
            buckets=buckets,
        )
        self.engine = Engine(params, config, engine_options, verbose=False)
        self.config, self.params, self.spec = config, params, self.engine.spec
        self.max_len, self.batch, self.cache_kind = int(max_len), int(batch), cache
        self.impl = resolve_impl(engine_options.model_options.impl)

    @property
    def cache(self):
        """The engine's batch cache (one row per sequence)."""
        return self.engine.cache

    @cache.setter
    def cache(self, value):
        self.engine.cache = value

    def decode_step_compiled(self):
        """``(step, rows)``: the engine's compiled decode step ``step(params, cache, tokens, *rows) -> (tokens,
        cache)`` and greedy, all-active sampling rows for it (device loops in benchmarks)."""
        return self.engine.steps.decode_executable(self.engine.params, self.cache), steps.greedy_rows(self.batch)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int | None = None,
        sampling: SamplingParams | None = None,
        seed: int | None = None,
        stop_ids: Sequence[int] | None = None,
        on_token: Callable[[int, int], None] | None = None,
    ) -> GenerationResult:
        """Continue each prompt (token ids) by up to ``max_new_tokens`` tokens.

        ``sampling`` (default ``SamplingParams()``, greedy) says how tokens are chosen; ``max_new_tokens``,
        ``seed`` and ``stop_ids``, when given, replace its fields of those names. A sequence ends at a stop
        token (not included in its output) or after ``max_new_tokens``. ``on_token(sequence_index, token_id)``
        is called for each new token as it arrives. Sequence ``i`` draws with ``seed + i``, so equal seeds give
        equal outputs.
        """
        sampling = SamplingParams() if sampling is None else sampling
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be a jkv.serving.SamplingParams, got {type(sampling).__name__}")
        if on_token is not None and not callable(on_token):
            raise TypeError(f"on_token must be a callable on_token(sequence_index, token), got {on_token!r}")
        n_new = sampling.max_new_tokens if max_new_tokens is None else max_new_tokens
        if not _is_int(n_new) or n_new < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {n_new!r}")
        # Checked as SamplingParams checks them: a seed outside [0, 2**32) is refused, never wrapped.
        given = {"seed": seed, "stop_tokens": stop_ids}
        sampling = dataclasses.replace(sampling, **{k: v for k, v in given.items() if v is not None})
        prompts = self._check_prompts(prompts, n_new)
        timing = Timing(prompt_tokens=sum(len(p) for p in prompts), batch=len(prompts))
        if n_new == 0:
            return GenerationResult([[] for _ in prompts], ["length"] * len(prompts), timing)
        seed, stops = sampling.seed, sampling.stop_tokens
        engine, stats = self.engine, self.engine.stats
        compile0, prefill0, steps0, start = engine.compile_s, stats.prefill_s, stats.decode_steps, time.perf_counter()
        index = {}
        stream = None if on_token is None else (lambda rid, token: on_token(index[rid], token))
        for i, prompt in enumerate(prompts):
            params = dataclasses.replace(sampling, seed=(seed + i) % 2**32, max_new_tokens=n_new, stop_tokens=stops)
            index[engine.submit(prompt, params, stream)] = i
        try:
            done = engine.run(show_progress=False)
        except BaseException:  # the next call starts from empty slots
            engine.abort()
            raise
        timing.compile_s = engine.compile_s - compile0
        # Steps that carried prompt tokens count as prefill, the others as decode.
        timing.prefill_s = stats.prefill_s - prefill0
        timing.decode_s = max(time.perf_counter() - start - timing.compile_s - timing.prefill_s, 0.0)
        timing.decode_steps = stats.decode_steps - steps0
        engine.cache.check()
        return GenerationResult([c.tokens for c in done], [c.finish_reason for c in done], timing)

    def _check_prompts(self, prompts, max_new_tokens) -> list[list[int]]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
            raise TypeError("prompts must be a non-empty list of token-id lists")
        if len(prompts) > self.batch:
            raise ValueError(f"{len(prompts)} prompts do not fit this generator's batch={self.batch}")
        out = []
        for i, prompt in enumerate(prompts):
            ids = np.asarray(prompt)
            if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"prompt {i} must be a non-empty list of token ids, got {prompt!r:.80}")
            if ids.min() < 0 or ids.max() >= self.config.vocab_size:
                raise ValueError(f"prompt {i} has token ids outside [0, vocab_size={self.config.vocab_size})")
            if ids.size > self.max_len:
                raise ValueError(f"prompt {i} has {ids.size} tokens, longer than max_len={self.max_len}")
            # The last generated token is never written to the cache: prompt + max_new_tokens - 1 positions.
            if ids.size + max_new_tokens - 1 > self.max_len:
                raise ValueError(
                    f"prompt {i} ({ids.size} tokens) + max_new_tokens={max_new_tokens} needs "
                    f"{ids.size + max_new_tokens - 1} cache positions, more than max_len={self.max_len}"
                )
            out.append(ids.astype(np.int32).tolist())
        return out


# ---------------------------------------------------------------------------------------------- text in, text out
@dataclasses.dataclass
class TextResult:
    text: str
    prompt_ids: list[int]
    tokens: list[int]
    finish_reason: str
    timing: Timing


def generate_text(
    model,
    prompt: str,
    *,
    chat: bool | None = None,
    max_new_tokens: int = 128,
    sampling: SamplingParams | None = None,
    seed: int = 0,
    max_len: int | None = None,
    cache: str = "default",
    impl: str | None = None,
    on_text: Callable[[str], None] | None = None,
) -> TextResult:
    """Generate from a loaded model (``jkv.loading.load``) and a text prompt.

    ``chat`` (default: whenever the model has a chat template) wraps the prompt as one user message in the
    model's chat format. ``max_len`` defaults to what the prompt and ``max_new_tokens`` need. ``on_text`` gets
    each new piece of text as it is decoded; the pieces join to the returned text (special tokens dropped).
    Generation stops at the tokenizer's stop tokens.
    """
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"{model.source!r} carries no tokenizer: use Generator with token ids instead")
    if chat is None:
        chat = tok.chat_template is not None
    text = tok.render_chat([{"role": "user", "content": prompt}]) if chat else prompt
    ids = tok.encode(text, add_eos=False)  # a prompt to continue: never EOS, whatever the model's flag
    if not ids:
        raise ValueError("the prompt is empty (it encodes to no token): give some text")
    if len(ids) > model.config.max_position:
        raise ValueError(
            f"the prompt has {len(ids)} tokens, longer than the model's context length {model.config.max_position}"
        )
    if max_len is not None and _is_int(max_len) and len(ids) > max_len:
        raise ValueError(f"the prompt has {len(ids)} tokens, longer than {max_len=}")
    # The last new token is never written to the cache; the refusal names the limit the caller knows of.
    positions = len(ids) + max_new_tokens - 1 if _is_int(max_new_tokens) else 0
    cap = model.config.max_position if max_len is None or not _is_int(max_len) else max_len
    if positions > cap:
        limit = f"the model's context length {cap}" if max_len is None else f"{max_len=}"
        raise ValueError(
            f"the prompt ({len(ids)} tokens) + {max_new_tokens=} needs {positions} cache positions, more than {limit}"
        )
    paged = cache in cache_kinds() and steps.is_paged(cache)
    if max_len is None:
        need = len(ids) + max(max_new_tokens, 1)
        max_len = min(model.config.max_position, max(256, -(-need // 256) * 256))
        if paged:  # whole pages, within a context of any length
            max_len -= max_len % steps.PAGE_SIZE
    elif _is_int(max_len) and paged:
        rounded = whole_pages(max_len)  # whole pages, as the engine's batch mode takes them
        max_len = rounded if rounded <= model.config.max_position else max_len  # else the cache refuses it
    generator = Generator(model.config, model.params, max_len=max_len, cache=cache, impl=impl)
    stream = tok.stream(skip_special=True)  # streamed as the returned text reads: special tokens dropped

    def on_token(_, token_id):
        if on_text is not None:
            piece = stream.push(token_id)
            if piece:
                on_text(piece)

    result = generator.generate(
        [ids], max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, stop_ids=tok.stop_ids, on_token=on_token
    )
    result.timing.load_s = model.load_seconds
    new = result.tokens[0]
    rest = stream.finish()
    if rest and on_text is not None:
        on_text(rest)
    return TextResult(tok.decode(new, skip_special=True), ids, new, result.finish_reasons[0], result.timing)


__all__ = [
    "GenerationResult",
    "Generator",
    "SamplingParams",
    "TextResult",
    "Timing",
    "cache_kinds",
    "generate_text",
]
