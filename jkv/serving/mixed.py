"""The mixed serving step on the device: a flat batch of decode tokens, speculative drafts and prompt chunks.

One function body, compiled once per token bucket ``T`` (and per ``rows``, the rows per sequence that reach the LM
head: 1, or ``k + 1`` with speculative decoding). Sequence ``b`` (slot ``b``) brings ``counts[b]`` tokens, rows
``starts[b] ..`` of the flat batch (``starts`` the exclusive cumulative sum of ``counts``); rows past
``sum(counts)`` are padding. In one step:

1. slots of ``reset`` are emptied (finished requests give their pages back before anything is allocated);
2. rows with ``src >= 0`` take the previous step's sampled token of slot ``src`` (``prev``), still on the device:
   the pipelined engine dispatches step ``i + 1`` before it reads step ``i``;
3. ``jkv.models.llama.flat_hidden_states`` writes every token's K/V and attends (the cache is donated);
4. the LM head runs on each sequence's last row (``rows == 1``: the argmax and the logits; where some row samples,
   ``sample_step`` draws from those logits after the step, a program of its own) or, for a verification
   (``verify[b]``), on all its rows: the greedy targets, the drafts the model agrees with, and a rollback past
   the rejected ones.

No ``cond`` or ``while`` outside the Pallas kernels: on a GPU XLA runs control flow from the host, reading the
predicate back, which would hold the dispatching thread until the step's forward pass is done.

A row whose logits hold NaN or Inf yields ``sampling.NONFINITE`` instead of a token.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jkv.models import llama
from jkv.serving.sampling import NONFINITE, choose


def pack(tokens, src, counts, verify, reset, xp=np):
    """The step's host inputs as one int32 array ``tokens [T] | src [T] | counts [B] | verify [B] | reset [B]``:
    one host-to-device copy a step, not five (each costs the dispatching thread a transfer of its own). ``xp``:
    ``numpy`` (the engine's host arrays) or ``jax.numpy`` (inside a traced step)."""
    return xp.concatenate([xp.asarray(x, dtype=xp.int32) for x in (tokens, src, counts, verify, reset)])


def packed_tokens(size: int, batch: int) -> int:
    """``T`` of a packed array of ``size`` entries for ``batch`` slots."""
    return (size - 3 * batch) // 2


def unpack(packed: Int[Array, " P"], batch: int):
    """``(tokens [T], src [T], counts [B], verify [B], reset [B])`` of :func:`pack`'s array (``verify`` and
    ``reset`` as booleans)."""
    t = packed_tokens(packed.shape[0], batch)
    tokens, src, counts = packed[:t], packed[t : 2 * t], packed[2 * t : 2 * t + batch]
    return tokens, src, counts, packed[2 * t + batch : 2 * t + 2 * batch] != 0, packed[2 * t + 2 * batch :] != 0


def reset_slots(cache, reset: Bool[Array, " B"]):
    """``cache`` with the slots of ``reset`` empty: length and error bits 0, a paged slot's pages given back."""
    cache = cache.rollback(jnp.where(reset, 0, cache.lengths))
    return cache.replace(errors=jnp.where(reset, 0, cache.errors))


def flat_rows(counts: Int[Array, " B"], t: int):
    """``(starts, last)`` ``[B]``: each sequence's first and last row in a flat batch of ``t`` rows (clipped into
    ``[0, t)``: a sequence without tokens points at some row, its output is not read)."""
    starts = jnp.cumsum(counts) - counts
    return jnp.clip(starts, 0, t - 1), jnp.clip(starts + counts - 1, 0, t - 1)


def mixed_step(
    params,
    cache,
    packed: Int[Array, " P"],
    prev: Int[Array, " B"],
    key_data,
    index,
    temperature,
    top_k,
    top_p,
    *,
    config,
    options,
    rows: int,
):
    """One serving step (see the module docstring). Returns ``((greedy [B], logits [B, V]), cache)`` when ``rows ==
    1`` (``greedy``: each sequence's argmax, ``sampling.NONFINITE`` where its logits are not finite), else
    ``((targets [B, rows], accepted [B]), cache)``; a verifying sequence's new tokens are
    ``targets[b, : accepted[b] + 1]``, any other sequence's next token is ``targets[b, 0]``. The sampling inputs
    (``key_data`` .. ``top_p``) are ``sample_step``'s: a step of greedy rows does not read them. ``packed``: the
    step's tokens, their sources, counts, verify flags and resets (:func:`pack`)."""
    tokens, src, counts, verify, reset = unpack(packed, prev.shape[0])
    b, t = counts.shape[0], tokens.shape[0]
    cache = reset_slots(cache, reset)
    tokens = jnp.where(src >= 0, prev[jnp.clip(src, 0, b - 1)], tokens)
    before = cache.lengths
    h, cache = llama.flat_hidden_states(params, cache, tokens, counts, config=config, options=options)  # (T, H)
    starts, last = flat_rows(counts, t)
    if rows == 1:
        logits = llama.lm_head(params, h[last], options, config=config)  # (B, V); config: a final soft cap
        return (choose(logits, key_data, index, temperature, top_k, top_p, draw=False), logits), cache
    first = jnp.where(verify, starts, last)
    at = jnp.minimum(first[:, None] + jnp.arange(rows), last[:, None])  # (B, rows); a short one repeats its last
    logits = llama.lm_head(params, h[at], options, config=config)  # (B, rows, V)
    targets = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    targets = jnp.where(jnp.all(jnp.isfinite(logits), axis=-1), targets, NONFINITE)
    drafts = tokens[jnp.clip(at[:, :-1] + 1, 0, t - 1)]  # (B, rows - 1): the token each target is checked against
    checked = jnp.arange(rows - 1)[None, :] < jnp.where(verify, counts - 1, 0)[:, None]
    agree = (drafts == targets[:, :-1]) & checked
    accepted = jnp.sum(jnp.cumprod(agree.astype(jnp.int32), axis=1), axis=1)  # leading drafts the model agrees with
    cache = cache.rollback(jnp.where(verify, before + accepted + 1, cache.lengths))
    return (targets, accepted), cache


def sample_step(
    logits: Float[Array, "B V"], key_data, index, temperature, top_k, top_p, *, truncate: bool = True
) -> Int[Array, " B"]:
    """The tokens of a step where some row samples (``logits`` the step's): a row of temperature 0 takes its
    argmax, the others draw with their request's parameters (``sampling.choose``; ``truncate=False`` when no row
    limits top-k or top-p: no sort). One program for every bucket."""
    return choose(logits, key_data, index, temperature, top_k, top_p, truncate=truncate)


def decode_only(params, cache, tokens: Int[Array, " B"], *rows, config, options):
    """``mixed_step`` of one token per slot (``T = B``), greedy: ``(next [B], cache)``."""
    b = tokens.shape[0]
    zeros, ones = jnp.zeros((b,), jnp.int32), jnp.ones((b,), jnp.int32)
    packed = pack(tokens, -ones, ones, zeros, zeros, xp=jnp)
    inputs = (packed, tokens, *rows)  # rows: key_data, index, temperature, top_k, top_p
    (greedy, _), cache = mixed_step(params, cache, *inputs, config=config, options=options, rows=1)
    return greedy, cache


def attach_prefix(cache, slot, pages, n, single):
    """Paged: slot ``slot`` starts as the first ``n`` positions of the pinned ``pages`` (shared, not copied).
    ``single`` is an empty one-sequence cache of the cache's format; nothing of it is written."""
    probe = single.replace(lengths=jnp.reshape(n, (1,)).astype(jnp.int32))
    return cache.insert_into_slot(slot, probe, prefix=(pages, n))


def restore_prefix(cache, slot, entry, n):
    """Contiguous: slot ``slot`` holds the first ``n`` positions of the device copy ``entry`` (cut before it goes
    in: a ring takes only what it keeps, and could not roll back far)."""
    return cache.insert_into_slot(slot, entry.replace(lengths=jnp.minimum(entry.lengths, n)))


def extract_copy(cache, slot, *, max_len: int):
    """A one-sequence copy of slot ``slot``'s first ``max_len`` positions."""
    return cache.extract_slot(slot, max_len=max_len)


def pin_pages(cache, slot, n):
    return cache.pin(slot, n)


def unpin_pages(cache, pages):
    return cache.unpin(pages)
