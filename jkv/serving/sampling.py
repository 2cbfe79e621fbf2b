"""How a request chooses its tokens: one ``SamplingParams``, one key scheme, and the on-device draw.

Key scheme: a request's PRNG key comes from its ``seed`` alone, and the key of its ``i``-th generated token is that
key folded with ``i``. Nothing else enters (not the slot, the batch size or the other requests), so a request
samples the same tokens alone or in any batch. Every parameter of ``sample`` is an array with one entry per row,
so one compiled step serves a batch whose requests sample differently. Only the chosen token ids leave the device.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jkv.caches.checks import is_number

# What a finished request's ``finish_reason`` says.
FINISH_REASONS = (
    "stop",  # a stop token came; the stop token itself is not part of the returned tokens
    "length",  # max_new_tokens tokens were generated
    "max_len",  # its cache row is full: prompt + generated tokens - 1 (the last is never written) = max_len
)


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request generates.

    ``temperature == 0`` is greedy (argmax); otherwise the logits are divided by ``temperature``, cut to the
    ``top_k`` most likely tokens (0: no cut), then to the smallest set whose probability reaches ``top_p`` (1: no
    cut), and a token is drawn with the request's key (``seed``, folded with the token's index). Generation ends
    after ``max_new_tokens`` tokens or at a token of ``stop_tokens``, which is not returned (``FINISH_REASONS``).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    max_new_tokens: int = 64
    stop_tokens: tuple[int, ...] = ()

    def __post_init__(self):
        if not is_number(self.temperature) or not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.temperature > FLOAT32_MAX:  # the step divides by it in float32, where it would be inf
            raise ValueError(
                f"temperature must be at most {FLOAT32_MAX:.7g} (float32's largest), got {self.temperature!r}"
            )
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0: no top-k cut), got {self.top_k!r}")
        if self.top_k >= 2**31:  # an int32 on the device; any k past the vocabulary cuts nothing
            raise ValueError(
                f"top_k must be below 2**31 (one at least the vocabulary size cuts nothing), got {self.top_k!r}"
            )
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**32:  # jax.random.key keeps 32 bits of larger seeds
            raise ValueError(f"seed must be an int in [0, 2**32), got {self.seed!r}")
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        iterable = not isinstance(self.stop_tokens, (str, bytes)) and hasattr(self.stop_tokens, "__iter__")
        stops = tuple(self.stop_tokens) if iterable else ()
        if not iterable or not all(_is_int(t) for t in stops):
            raise ValueError(f"stop_tokens must be a sequence of token ids (ints), got {self.stop_tokens!r}")
        # Python numbers from here on: NumPy scalars would compare and hash alike, but print and serialize apart.
        casts = (("temperature", float), ("top_k", int), ("top_p", float), ("seed", int), ("max_new_tokens", int))
        for name, cast in casts:
            object.__setattr__(self, name, cast(getattr(self, name)))
        object.__setattr__(self, "stop_tokens", tuple(int(t) for t in stops))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@functools.lru_cache(maxsize=4096)  # one device call per seed, not one per slot change
def request_key_data(seed: int) -> np.ndarray:
    """The raw key data of a request's PRNG key (host array, ``uint32[2]``; read-only, as the cache shares it): a
    function of its seed only."""
    data = np.asarray(jax.random.key_data(jax.random.key(seed)))
    data.flags.writeable = False
    return data


def token_keys(key_data: Array, index: Int[Array, " B"]):
    """Per row, the key of the row's ``index[b]``-th generated token: its request key folded with the index."""
    return jax.vmap(lambda kd, i: jax.random.fold_in(jax.random.wrap_key_data(kd), i))(key_data, index)


def sample(
    logits: Float[Array, "B V"],
    keys,
    temperature: Float[Array, " B"],
    top_k: Int[Array, " B"],
    top_p: Float[Array, " B"],
    *,
    draw: bool = True,
    truncate: bool = True,
) -> Int[Array, " B"]:
    """One token per row.

    ``temperature[b] == 0`` picks the argmax (greedy, deterministic). Otherwise the logits are divided by the
    temperature, restricted to the ``top_k[b]`` most likely tokens (``0``: no limit) and to the smallest set whose
    probability reaches ``top_p[b]`` (``1.0``: no limit), and one token is drawn with ``keys[b]`` (typed PRNG keys).

    ``draw`` (static) says whether any row may sample. The sampling path sorts every row (a 128k-entry sort per row
    for Llama 3); with ``draw=False`` only the argmax is computed, and every row must be greedy. The choice is not
    a ``lax.cond`` on the temperatures: on a GPU a conditional reads its predicate back to the host, holding the
    dispatching thread until the program has reached it (the engine's step takes the argmax, and a program of its
    own draws where some slot samples: ``jkv.serving.mixed.sample_step``). ``truncate=False`` (static): no row
    limits top-k or top-p, so the sort is skipped and each sampling row draws from all its tokens.
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not draw:
        return greedy
    return jnp.where(temperature > 0, _draw(logits, keys, temperature, top_k, top_p, truncate), greedy)


def _draw(logits, keys, temperature, top_k, top_p, truncate: bool) -> Int[Array, " B"]:
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    if not truncate:
        return jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, scaled).astype(jnp.int32)
    masked = jnp.where(kept_tokens(scaled, top_k, top_p), scaled, -jnp.inf)
    return jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, masked).astype(jnp.int32)


def kept_tokens(scaled: Float[Array, "B V"], top_k: Int[Array, " B"], top_p: Float[Array, " B"]):
    """``bool[B, V]``: the tokens each row may draw after its top-k and top-p cuts (``scaled``: the logits over
    the temperature)."""
    vocab = scaled.shape[-1]
    ordered = jnp.sort(scaled, axis=-1)[:, ::-1]  # (B, V) descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)  # (B, 1): smallest logit kept by top-k
    ordered = jnp.where(jnp.arange(vocab)[None, :] < k[:, None], ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    # Keep token i (in descending order) while the mass before it is below top_p: the first token always stays,
    # also where top_p is 0 in float32 (a valid top_p of 1e-300); top_p = 1 keeps all, though the float32 running
    # sum of a peaked row reaches 1 before its last tokens (a row drawing uncut in the program without the sort
    # draws the same token here).
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = (before < top_p[:, None]) | (top_p[:, None] >= 1) | (jnp.arange(vocab)[None, :] == 0)
    cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)  # smallest kept logit
    return scaled >= jnp.maximum(kth, cutoff)


# A sampled token id that says "this row's logits held NaN or Inf" (checked on the host with the tokens).
NONFINITE = -1


def choose(
    logits: Float[Array, "B V"], key_data, index, temperature, top_k, top_p, *, draw: bool = True, truncate: bool = True
) -> Int[Array, " B"]:
    """``sample`` (``draw``, ``truncate`` as there) with the scheme's keys, and ``NONFINITE`` in rows whose logits
    are not all finite: the check travels with the token ids, so it costs the host no extra read."""
    keys = token_keys(key_data, index)
    tokens = sample(logits, keys, temperature, top_k, top_p, draw=draw, truncate=truncate)
    return jnp.where(jnp.all(jnp.isfinite(logits), axis=-1), tokens, NONFINITE)


def sampling_rows(params: list[SamplingParams | None], index: list[int]):
    """Host arrays of a batch's sampling inputs, one row per slot (``None``: an idle slot, greedy):
    ``(key_data, index, temperature, top_k, top_p)``."""
    idle = SamplingParams()
    rows = [idle if p is None else p for p in params]
    return (
        np.stack([request_key_data(p.seed) for p in rows]),
        np.asarray(index, np.int32),
        np.asarray([p.temperature for p in rows], np.float32),
        np.asarray([p.top_k for p in rows], np.int32),
        np.asarray([p.top_p for p in rows], np.float32),
    )
