"""Text generation over the Llama-family model: prefill, a jitted decode step with the cache donated, sampling on
the device, stop tokens, streaming, and timing split into load, compile, prefill and decode.

Only token ids cross to the host (4 bytes per sequence per step). The host loop dispatches step ``i + 1`` before
it reads the tokens of step ``i``, so the device never waits for the host between steps.

A batch of prompts of different lengths is prefilled together, right-padded to a bucket size (powers of two, so
few prefill shapes compile); each sequence's logits are read at its own last prompt token and the cache is rolled
back to the true prompt lengths, so the padding is overwritten by the first decode steps.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jkv.attention import resolve_impl
from jkv.caches import CacheSpec, kinds, make_cache
from jkv.caches.registry import PAGE_SIZE  # noqa: F401  (re-exported: the paged kinds' page size)
from jkv.models import llama
from jkv.sampling import sample

MIN_PREFILL_BUCKET = 16


# ---------------------------------------------------------------------------------------------- sampling
@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. ``temperature == 0`` is greedy (argmax); otherwise the logits are divided
    by ``temperature``, cut to the ``top_k`` most likely tokens (0: no cut), then to the smallest set whose
    probability reaches ``top_p`` (1: no cut), and a token is drawn from what remains."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, (int, np.integer)) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0: no top-k cut), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def next_tokens(logits: Float[Array, "B V"], key, step, sampling_args, *, greedy: bool) -> Int[Array, " B"]:
    """Greedy argmax, or a draw by ``jkv.sampling.sample`` with a key per row folded from ``key`` and ``step``."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    b = logits.shape[0]
    temperature, top_k, top_p = (jnp.broadcast_to(x, (b,)) for x in sampling_args)
    step_key = jax.random.fold_in(key, step)
    keys = jax.vmap(lambda row: jax.random.fold_in(step_key, row))(jnp.arange(b))
    return sample(logits, keys, temperature, top_k, top_p)


# ---------------------------------------------------------------------------------------------- caches
def cache_kinds() -> dict[str, Callable[[CacheSpec, int], object]]:
    """Every cache kind of the registry (``jkv.caches.kinds()``), by ``--cache`` name: ``spec, batch -> cache``."""
    return {name: functools.partial(make_cache, name) for name in kinds()}


# ---------------------------------------------------------------------------------------------- results
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
        return (
            f"load {self.load_s:.2f} s | compile {self.compile_s:.2f} s | prefill {self.prompt_tokens} tokens "
            f"{1e3 * self.prefill_s:.1f} ms | decode {self.decode_steps} steps x batch {self.batch}: "
            f"{self.ms_per_step:.2f} ms/step, {self.tokens_per_s:.1f} tokens/s"
        )


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens of each sequence, stop token excluded
    finish_reasons: list[str]  # "stop" (a stop token came) or "length" (max_new_tokens reached)
    timing: Timing


# ---------------------------------------------------------------------------------------------- the generator
class Generator:
    """Compiled prefill and decode for one model, one batch size and one cache capacity.

    The decode step is compiled once (on first use) with the cache donated and serves every position; prefill
    compiles once per bucket of prompt length. ``compile_s`` in each result counts the compiles it triggered.
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
    ):
        llama.check_params(params, config)
        if not isinstance(max_len, (int, np.integer)) or isinstance(max_len, bool) or max_len < 2:
            raise ValueError(f"max_len must be an int >= 2, got {max_len!r}")
        if max_len > config.max_position:
            raise ValueError(f"{max_len=} exceeds the model's context length max_position={config.max_position}")
        if not isinstance(batch, (int, np.integer)) or isinstance(batch, bool) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        kinds = cache_kinds()
        if cache == "default":
            cache = "f32" if params.dtype == jnp.float32 else "bf16"
        if cache not in kinds:
            raise ValueError(f"cache={cache!r} is not one of {sorted(kinds)}")
        self.config, self.params = config, params
        self.max_len, self.batch, self.cache_kind = int(max_len), int(batch), cache
        self.impl = resolve_impl(impl)
        self.spec = CacheSpec(config.num_layers, config.num_kv_heads, config.head_dim, self.max_len)
        self.cache = kinds[cache](self.spec, self.batch)
        self._decode = {}  # greedy flag -> compiled step
        self._prefill = {}  # (bucket, greedy) -> compiled prefill
        self._key = jax.random.key(0)

    # ------------------------------------------------------------------ compiled pieces
    def _prefill_fn(self, params, cache, tokens, lengths, key, sampling_args, *, greedy):
        logits, cache = llama.prefill(params, cache, tokens, lengths - 1, config=self.config, impl=self.impl)
        cache = cache.rollback(lengths)  # drop the right padding: the decode steps overwrite it
        return next_tokens(logits, key, 0, sampling_args, greedy=greedy), cache

    def _decode_fn(self, params, cache, tokens, key, step, sampling_args, *, greedy):
        logits, cache = llama.decode_step(params, cache, tokens, config=self.config, impl=self.impl)
        return next_tokens(logits, key, step, sampling_args, greedy=greedy), cache

    def _compiled(self, table, key, fn, args, donate):
        """AOT-compile ``fn`` for ``args`` once; return it and the seconds spent compiling (0 when cached)."""
        if key in table:
            return table[key], 0.0
        start = time.perf_counter()
        table[key] = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
        return table[key], time.perf_counter() - start

    def decode_step_compiled(self, greedy: bool = True):
        """The compiled decode step ``(params, cache, tokens, key, step, (t, k, p)) -> (tokens, cache)``."""
        args = (self.params, self.cache, jnp.zeros((self.batch,), jnp.int32), self._key, jnp.int32(0))
        args += (_sampling_args(Sampling()),)
        fn = functools.partial(self._decode_fn, greedy=greedy)
        return self._compiled(self._decode, greedy, fn, args, donate=(1,))

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 64,
        sampling: Sampling = Sampling(),
        seed: int = 0,
        stop_ids: Sequence[int] = (),
        on_token: Callable[[int, int], None] | None = None,
    ) -> GenerationResult:
        """Continue each prompt (token ids) by up to ``max_new_tokens`` tokens.

        Generation of a sequence ends at a token in ``stop_ids`` (not included in its output) or after
        ``max_new_tokens``. ``on_token(sequence_index, token_id)`` is called for each new token as it arrives.
        With ``sampling.temperature > 0`` the draw depends only on ``seed``, so equal seeds give equal outputs.
        """
        if not isinstance(sampling, Sampling):
            raise TypeError(f"sampling must be a jkv.generate.Sampling, got {type(sampling).__name__}")
        prompts = self._check_prompts(prompts, max_new_tokens)
        if max_new_tokens == 0:
            return GenerationResult([[] for _ in prompts], ["length"] * len(prompts), Timing(batch=self.batch))
        n = len(prompts)
        lengths = np.array([len(p) for p in prompts] + [1] * (self.batch - n), np.int32)
        bucket = min(max(MIN_PREFILL_BUCKET, 1 << int(lengths.max() - 1).bit_length()), self.max_len)
        tokens = np.zeros((self.batch, bucket), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
        key = jax.random.key(seed)
        sargs = _sampling_args(sampling)
        timing = Timing(prompt_tokens=int(lengths[:n].sum()), batch=n)

        self.cache = self.cache.reset()
        fn = functools.partial(self._prefill_fn, greedy=sampling.greedy)
        args = (self.params, self.cache, jnp.asarray(tokens), jnp.asarray(lengths), key, sargs)
        prefill, seconds = self._compiled(self._prefill, (bucket, sampling.greedy), fn, args, donate=(1,))
        step_fn, seconds_decode = self.decode_step_compiled(sampling.greedy)
        timing.compile_s = seconds + seconds_decode

        start = time.perf_counter()
        current, self.cache = prefill(*args)
        current.block_until_ready()
        timing.prefill_s = time.perf_counter() - start

        start = time.perf_counter()
        outputs: list[list[int]] = [[] for _ in range(n)]
        reasons = ["length"] * n
        live = np.ones(n, bool)
        stops = set(int(s) for s in stop_ids)
        for i in range(max_new_tokens):
            upcoming = None
            if i + 1 < max_new_tokens:  # queue the next step before waiting for this one's tokens
                upcoming, self.cache = step_fn(self.params, self.cache, current, key, jnp.int32(i + 1), sargs)
                timing.decode_steps += 1
            host = np.asarray(current)
            for b in np.flatnonzero(live):
                token = int(host[b])
                if token in stops:
                    live[b], reasons[b] = False, "stop"
                    continue
                outputs[b].append(token)
                if on_token is not None:
                    on_token(int(b), token)
            if not live.any():
                break
            current = upcoming
        if upcoming is not None:
            upcoming.block_until_ready()
        timing.decode_s = time.perf_counter() - start
        self.cache.check()
        return GenerationResult(outputs, reasons, timing)

    def _check_prompts(self, prompts, max_new_tokens) -> list[list[int]]:
        if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
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


def _sampling_args(sampling: Sampling):
    return (jnp.float32(sampling.temperature), jnp.int32(sampling.top_k), jnp.float32(sampling.top_p))


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
    sampling: Sampling = Sampling(),
    seed: int = 0,
    max_len: int | None = None,
    cache: str = "default",
    impl: str | None = None,
    on_text: Callable[[str], None] | None = None,
) -> TextResult:
    """Generate from a loaded model (``jkv.loading.load``) and a text prompt.

    ``chat`` (default: whenever the model has a chat template) wraps the prompt as one user message in the
    model's chat format. ``max_len`` defaults to what the prompt and ``max_new_tokens`` need. ``on_text`` gets
    each new piece of text as it is decoded.
    """
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"{model.source!r} carries no tokenizer: use Generator with token ids instead")
    if chat is None:
        chat = tok.chat_template is not None
    text = tok.render_chat([{"role": "user", "content": prompt}]) if chat else prompt
    ids = tok.encode(text)
    if len(ids) > model.config.max_position:
        raise ValueError(
            f"the prompt has {len(ids)} tokens, longer than the model's context length {model.config.max_position}"
        )
    if max_len is None:
        need = len(ids) + max(max_new_tokens, 1)
        max_len = min(model.config.max_position, max(256, -(-need // 256) * 256))
    elif len(ids) > max_len:
        raise ValueError(f"the prompt has {len(ids)} tokens, longer than {max_len=}")
    generator = Generator(model.config, model.params, max_len=max_len, cache=cache, impl=impl)
    stream = tok.stream()

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
    return TextResult(tok.decode(new, skip_special=True), ids, new, result.finish_reasons[0], result.timing)
