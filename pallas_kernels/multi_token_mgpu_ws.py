"""A warp-specialised variant of the Mosaic GPU multi-token kernel (contiguous cache): two consumer warpgroups share
one K/V ring that a producer warpgroup fills (the structure of jax's Hopper flash-attention kernel), so each K/V
block goes through shared memory once per 128 query rows instead of once per 64.

Same call and results as :func:`pallas_kernels.multi_token_mgpu.multi_token_attention_mgpu`. A tile is
``2 * block_q`` tokens of one sequence (``multi_token_tiles.tile_table`` at that size); consumer ``w`` takes tokens
``w * block_q ..`` of it, x the tile's query heads, as its own 64-row MMA tile with its own key range, and waits
for (and releases) every block of the tile's range in order, skipping the compute of blocks outside its own. Both
consumers zero the same V rows (outside the tile's key range) before their PV product: the same zeros, whichever
writes first. How the producer fills a ring slot is a :class:`Fill` (the contiguous cache's blocks by default;
pages through the block table: ``multi_token_mgpu_ws_paged``).

``config.pingpong`` (FlashAttention-3's ping-pong schedule): the consumers take turns at the tensor cores through
a barrier of two arrivals, so that one's softmax runs while the other's products do. In each step a consumer takes
two turns (arrives, then waits): one after issuing ``q @ K^T``, before reading the scores, and one after its
softmax, before issuing ``p @ V`` (the V slot's wait sits between that turn's arrival and its wait). Consumer 1
takes one turn before its loop and consumer 0 one after it, so consumer 0 arrives at phases ``2i, 2i + 1`` in step
``i`` and consumer 1 at ``2i + 1, 2i + 2``: each phase pairs one consumer's issued scores with the other's finished
softmax. A consumer also waits for the next block's K while its ``p @ V`` runs (the first block's before the loop).
Why it cannot hang:

* each consumer waits once on every phase, after its own arrival at it, so neither can arrive twice in one phase
  (and the parity a waiting thread tracks stays right);
* both consumers arrive ``2 * (t_hi - t_lo) + 1`` times on every tile, whatever their own keys: both run every
  step of the tile's range (their five loops cut it at the monotone bounds of ``_own_range``), and a skip step
  takes the same two turns as a computed one, between the same ring waits and releases;
* a consumer's ring waits need only releases that the other makes before the arrival this consumer waits on next,
  so no wait closes a cycle: block ``i + 1``'s K (waited after step ``i``'s second turn) needs block ``i``'s K slot
  and the V slots before it released, block ``i``'s V (waited inside that turn) the slots before block ``i``; a
  consumer releases block ``i``'s K slot before its second arrival in step ``i``, its V slot before its first
  arrival in step ``i + 1``.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from pallas_kernels import backend
from pallas_kernels import multi_token_mgpu as mgpu
from pallas_kernels import multi_token_mgpu_kernel as kernel
from pallas_kernels.mgpu_common import ROWS, initial_carry, mma_accumulate, mma_scores, swizzled
from pallas_kernels.multi_token_tiles import ALIGN, NCOL, tile_table

CONSUMERS = 2


class Where(NamedTuple):
    """A program's place in the cache (traced int32 scalars): what a :data:`Locate` reads."""

    layer: jax.Array
    b: jax.Array
    kv_head: jax.Array
    lo: jax.Array  # the tile's keys lo .. hi - 1 (multi_token_tiles.tile_table; steps only where lo < hi)
    hi: jax.Array


# locate(where, start) -> [(index, rows)]: the TMA copies that fill a ring slot with the block_k positions from
# `start` of K or V: per copy the index of its source in the whole cache or pool (`ref.at[index]`) and the slot's
# rows it fills (None: all of them); all arrive on the slot's barrier.
Locate = Callable[..., list]


class Fill(NamedTuple):
    """How the producer fills a ring slot (static: each distinct value compiles its own kernel)."""

    locate: Locate
    capacity: int  # positions a sequence can hold: a block past it slides back to end at it
    copies: int  # len(locate(...)): TMA copies per K or V slot, the slot barrier's arrivals


def contiguous_copies(where: Where, start, *, block_k: int) -> list:
    """A :data:`Locate` over a whole ``[L, B, K, S, D]`` cache: one copy of the block."""
    return [((where.layer, where.b, where.kv_head, pl.ds(start, block_k)), None)]


def _own_range(wg, skip, nrows, pos_base, hi, tile_t_lo, *, block_q, block_k, window):
    """Consumer ``wg``'s rows of the tile and its blocks: ``(skip, nrows, pos_base, t_lo, u_lo, u_hi, t_hi)``
    (``tile_table``'s rules on its ``block_q`` tokens; no rows or no keys: the empty range at the tile's first
    block, so that every block of the tile is skipped)."""
    tok0 = wg * block_q
    first, last = jnp.maximum(skip, tok0), jnp.minimum(skip + nrows, tok0 + block_q)
    own = jnp.maximum(last - first, 0)
    pos_first = pos_base + first
    lo = 0 if window is None else jnp.maximum(pos_first - window + 1, 0)
    has_keys = (own > 0) & (hi > 0)
    t_lo = jnp.where(has_keys, lo // block_k, tile_t_lo)
    t_hi = jnp.where(has_keys, -(-(pos_first + own) // block_k), tile_t_lo)
    w_hi = 0 if window is None else jnp.maximum(pos_first + own - window, 0)
    u_lo = jnp.minimum(jnp.maximum(-(-w_hi // block_k), t_lo), t_hi)
    u_hi = jnp.minimum(jnp.maximum((pos_first + 1) // block_k, u_lo), t_hi)
    return jnp.where(own > 0, first - tok0, 0), own, pos_base + tok0, t_lo, u_lo, u_hi, t_hi


def _kernel(table_ref, layer_ref, q_ref, k_ref, v_ref, o_ref, *, config, group, scale, window, softcap, fill=None):
    # refs as in multi_token_mgpu_kernel.kernel; the tile table is cut at 2 * block_q tokens; fill: a Fill (None:
    # a contiguous [L, B, K, S, D] cache)
    plgpu = backend.mosaic_gpu_module()
    block_q, heads, block_k, stages = config.block_q, config.heads_per_tile, config.block_k, config.num_stages
    pingpong = config.pingpong
    num_layers, _, _, max_len, head_dim = k_ref.shape
    if fill is None:
        fill = Fill(functools.partial(contiguous_copies, block_k=block_k), capacity=max_len, copies=1)
    dtype = k_ref.dtype
    head_group, tile = lax.axis_index("heads"), lax.axis_index("tile")
    b, row0, skip, nrows, pos_base, lo, hi, t_lo, _, _, t_hi = (table_ref[tile * NCOL + c] for c in range(NCOL))
    row0 = pl.multiple_of(row0, ALIGN)
    layer = jnp.minimum(jnp.maximum(layer_ref[0], 0), num_layers - 1)
    first_head = head_group * heads
    kv_head = lax.div(first_head, jnp.int32(group))
    steps = t_hi - t_lo

    window_start = functools.partial(kernel.block_start, block_k=block_k, max_len=fill.capacity)
    where = Where(layer=layer, b=b, kv_head=kv_head, lo=lo, hi=hi)

    def scoped(q_smem, o_smem, k_smem, v_smem, q_barriers, k_barriers, v_barriers, k_free, v_free, *turns):
        # turns: the ping-pong schedule's barrier (config.pingpong), else none
        wg = lax.axis_index("wg")

        def turn_arrive():  # this consumer's half of a turn is done (no-ops without pingpong)
            if pingpong:
                plgpu.barrier_arrive(turns[0])

        def turn_wait():  # ... and the other consumer's too
            if pingpong:
                plgpu.barrier_wait(turns[0])

        def take_turn():
            turn_arrive()
            turn_wait()

        def wait_k(i):  # block i's K (pingpong: waited one step ahead, while the step before's PV product runs)
            @pl.when(i < steps)
            def _wait():
                plgpu.barrier_wait(k_barriers.at[lax.rem(i, jnp.int32(stages))])

        def fetch(i, slot, wait: bool):  # K, then V, of the loop's block i into a ring slot (once freed)
            copies = fill.locate(where, window_start(t_lo + i))  # a page table's reads ahead of the wait
            if len(copies) != fill.copies:  # the slot barrier's arrival count: a mismatch would hang the consumers
                raise ValueError(f"fill.locate gave {len(copies)} copies per slot, fill.copies={fill.copies}")
            for ref, smem, barriers, free in ((k_ref, k_smem, k_barriers, k_free), (v_ref, v_smem, v_barriers, v_free)):
                if wait:
                    plgpu.barrier_wait(free.at[slot])
                for index, rows in copies:
                    dst = smem.at[slot] if rows is None else smem.at[slot, rows]
                    plgpu.copy_gmem_to_smem(ref.at[index], dst, barriers.at[slot])

        @pl.when(wg == CONSUMERS)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            for i in range(stages):

                @pl.when(i < steps)
                def _first(i=i):
                    fetch(i, i, wait=False)

            @pl.loop(0, jnp.maximum(steps - stages, 0))
            def _refill(i):
                fetch(i + stages, lax.rem(i, jnp.int32(stages)), wait=True)

        @pl.when(wg < CONSUMERS)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            own = _own_range(wg, skip, nrows, pos_base, hi, t_lo, block_q=block_q, block_k=block_k, window=window)
            my_skip, my_rows, my_base, my_lo, my_ulo, my_uhi, my_hi = own
            my_q = q_smem.at[wg]
            for g in range(heads):
                src = q_ref.at[pl.ds(pl.multiple_of(row0 + wg * block_q, ALIGN), block_q), first_head + g]
                barrier = q_barriers.at[wg * heads + g]
                plgpu.copy_gmem_to_smem(src, my_q.at[pl.ds(g * block_q, block_q)], barrier)
            for g in range(heads):
                plgpu.barrier_wait(q_barriers.at[wg * heads + g])

            def step(i, carry, kind: str):
                slot = lax.rem(i, jnp.int32(stages))
                t = t_lo + i
                start = window_start(t)
                if not pingpong:
                    plgpu.barrier_wait(k_barriers.at[slot])
                if kind == "skip":  # outside this consumer's keys: release the slot, keep the barriers' phases
                    plgpu.barrier_arrive(k_free.at[slot])
                    take_turn()  # pingpong: the two turns of a computed step (see the module doc)
                    turn_arrive()
                    plgpu.barrier_wait(v_barriers.at[slot])
                    turn_wait()
                    plgpu.barrier_arrive(v_free.at[slot])
                    if pingpong:
                        wait_k(i + 1)
                    return carry
                s = mma_scores(my_q, k_smem, slot, block_k, issued=take_turn)
                plgpu.barrier_arrive(k_free.at[slot])
                row_limits = (my_base, block_q, window) if kind == "masked" else None
                options = dict(start=start, t=t, scale=scale, softcap=softcap)
                p, m_new, denom, acc = kernel.softmax_block(s, carry, row_limits, **options)
                if pingpong:  # the softmax done before the turn passes (arithmetic could move past an arrival)
                    acc, m_new, denom, p = lax.optimization_barrier((acc, m_new, denom, p.astype(dtype)))
                turn_arrive()
                plgpu.barrier_wait(v_barriers.at[slot])
                if kind == "masked":  # the tile's key range: both consumers write the same zeros
                    kernel.zero_v_outside(v_smem, slot, start=start, t=t, lo=lo, hi=hi)
                turn_wait()
                next_k = functools.partial(wait_k, i + 1) if pingpong else None
                acc = mma_accumulate(acc, p, v_smem, slot, issued=next_k)
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, denom

            carry = initial_carry(head_dim)
            if pingpong:  # the first block's K, then consumer 1 a turn behind consumer 0
                wait_k(0)
                pl.when(wg == 1)(take_turn)
            bounds = (0, my_lo - t_lo, my_ulo - t_lo, my_uhi - t_lo, my_hi - t_lo, steps)
            kinds = ("skip", "masked", "plain", "masked", "skip")
            for (a, z), kind in zip(itertools.pairwise(bounds), kinds, strict=True):
                carry = lax.fori_loop(a, z, functools.partial(step, kind=kind), carry)
            if pingpong:  # consumer 0's last turn, which consumer 1's last step waits for
                pl.when(wg == 0)(take_turn)
            acc, _, denom = carry
            kernel.store_rows(
                plgpu, acc, denom, o_smem.at[wg], o_ref, row0 + wg * block_q, my_skip, my_rows, first_head, config
            )

    pl.run_scoped(
        scoped,
        plgpu.SMEM((CONSUMERS, ROWS, head_dim), dtype, transforms=swizzled(dtype)),
        plgpu.SMEM((CONSUMERS, ROWS, head_dim), o_ref.dtype),
        plgpu.SMEM((stages, block_k, head_dim), dtype, transforms=swizzled(dtype)),
        plgpu.SMEM((stages, block_k, head_dim), dtype, transforms=swizzled(dtype)),
        plgpu.Barrier(num_barriers=CONSUMERS * heads),
        plgpu.Barrier(num_arrivals=fill.copies, num_barriers=stages),
        plgpu.Barrier(num_arrivals=fill.copies, num_barriers=stages),
        plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
        *([plgpu.Barrier(num_arrivals=CONSUMERS)] if pingpong else []),
        collective_axes="wg",
    )


@functools.partial(jax.jit, static_argnames=("scale", "window", "softcap", "config"))
def _attend(q, k, v, q_starts, lengths, counts, layer, *, scale, window, softcap, config):
    # as multi_token_mgpu._attend for a contiguous [L, B, K, S, D] cache
    num_rows, num_heads, _ = q.shape
    table = tile_table(
        q_starts,
        lengths,
        counts,
        num_rows=num_rows,
        block_q=CONSUMERS * config.block_q,
        block_k=config.block_k,
        window=window,
    )
    group = num_heads // k.shape[2]
    body = functools.partial(_kernel, config=config, group=group, scale=scale, window=window, softcap=softcap)

    def jkv_multi_token_attention_mgpu_ws(*refs):  # the kernel's name in profiles
        body(*refs)

    threads = dict(num_threads=CONSUMERS + 1, thread_name="wg")
    return mgpu.launch(jkv_multi_token_attention_mgpu_ws, table, layer, q, k, v, config=config, **threads)


def multi_token_attention_mgpu_ws(
    q: Float[Array, "T N D"],
    k: Float[Array, "*L B K S D"],
    v: Float[Array, "*L B K S D"],
    q_starts: Int[Array, " B"],
    lengths: Int[Array, " B"],
    counts: Int[Array, " B"],
    *,
    layer=None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    config: mgpu.MgpuMultiTokenConfig | None = None,
) -> Float[Array, "T N D"]:
    """:func:`pallas_kernels.multi_token_mgpu.multi_token_attention_mgpu`, warp-specialised (see the module doc)."""
    q_starts, lengths, counts = (jnp.asarray(x).astype(jnp.int32) for x in (q_starts, lengths, counts))
    options = dict(window=window, softcap=softcap)
    _, n, kh, _, d = mgpu.check_mgpu_args(q, k, v, q_starts, lengths, counts, layer, **options)
    config = mgpu.resolve_config(config, n, kh, d, k.dtype, q.dtype, consumers=CONSUMERS)
    mgpu.require_mosaic_gpu()
    k, v, layer = mgpu.whole_cache(k, v, layer, config.block_k)
    return _attend(q, k, v, q_starts, lengths, counts, layer, **mgpu.static_options(scale, d, window, softcap, config))
