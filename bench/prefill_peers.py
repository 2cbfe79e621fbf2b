"""The peers of bench/bench_prefill.py: jax's ``dot_product_attention`` (cuDNN) over a cached prefix and new keys,
torch SDPA's flash backend with a bottom-right causal mask, and the cache cut into permuted pages.

``case`` is a ``bench_prefill.Case`` (batch, cached, new, max_len, heads); input sets are ``bench_prefill``'s
``(q [T, N, D], k, v [B, K, S, D], q_starts, lengths, counts)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bench import common, torch_peers

PAGE_SIZE = 16


def dpa_sets(case, sets: list) -> list:
    """``(q [B, T, N, D], k, v [B, S', K, D] of the cached prefix, k, v of the new positions)`` for jax's
    ``dot_product_attention`` (copies made here, outside the timing)."""
    n, _, d = case.heads
    to_bskd = lambda x, a, b: jnp.swapaxes(x[:, :, a:b], 1, 2)
    out = []
    for q, k, v, *_ in sets:
        prefix = (to_bskd(k, 0, case.cached), to_bskd(v, 0, case.cached)) if case.cached else (None, None)
        new = (to_bskd(k, case.cached, case.cached + case.new), to_bskd(v, case.cached, case.cached + case.new))
        out.append((q.reshape(case.batch, case.new, n, d), *prefix, *new))
    return out


def dpa(case, implementation: str):
    """jax's ``dot_product_attention`` over a cached prefix and new keys: one causal call for a prefill, else the
    prefix (no mask) and the new keys (causal, square) merged by their log-sum-exps (``return_residual``, which
    makes cuDNN's forward write its ``[B, N, T]`` statistics too)."""

    def attend(q, k, v, causal, residual):
        out = jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation=implementation, return_residual=residual
        )
        return out if residual else (out, None)

    def fn(q, k_old, v_old, k_new, v_new):
        out, lse = attend(q, k_new, v_new, True, k_old is not None)
        if k_old is not None:
            out_old, lse_old = attend(q, k_old, v_old, False, True)
            lse, lse_old = lse.astype(jnp.float32), lse_old.astype(jnp.float32)
            total = jnp.logaddexp(lse, lse_old)
            w, w_old = jnp.exp(lse - total)[..., None], jnp.exp(lse_old - total)[..., None]  # [B, T, N, 1]
            out = (out.astype(jnp.float32) * w + out_old.astype(jnp.float32) * w_old).astype(q.dtype)
        return out

    return fn


def torch_flash(torch, case, expand: bool):
    """torch SDPA forced to the flash backend on ``[B, N, T, D]`` queries and ``[B, K, S', D]`` readable K/V
    (``enable_gqa``; ``expand``: K/V heads repeated to N outside the timing instead, where that is refused)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    n, kh, d = case.heads
    keys = case.cached + case.new
    mask = None if case.cached == 0 else causal_lower_right(case.new, keys)

    def fn(q, k, v):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=not expand
            )

    def kv(x):  # a copy: the readable positions only (and every query head's own, expanded)
        x = x[:, :, :keys]
        return torch.from_dlpack(jnp.repeat(x, n // kh, axis=1) if expand else x)

    def to_torch(sets):
        q_bntd = lambda q: jnp.swapaxes(q.reshape(case.batch, case.new, n, d), 1, 2)
        return [(torch.from_dlpack(q_bntd(q)), kv(k), kv(v)) for q, k, v, *_ in sets]

    return fn, to_torch


def bench_torch(torch, case, sets, ref, work: int, est_s: float, *, sample: bool, log) -> tuple[dict, object]:
    """The ``torch_flash`` row (enable_gqa, else expanded K/V) and its sampler for the interleaved rounds."""
    errors = []
    for expand in (False, True):
        fn, to_torch = torch_flash(torch, case, expand)
        try:
            tsets = to_torch(sets)
            out = jnp.asarray(np.asarray(fn(*tsets[0]).float().cpu()))
            err = common.rel_err(jnp.swapaxes(out, 1, 2).reshape(ref.shape), ref)
            timing = torch_peers.time_torch(torch, fn, tsets, est_s)
        except Exception as e:  # torch's flash backend refused: report it, try expanded K/V
            errors.append(f"{type(e).__name__}: {str(e)[:700]}")
            log(f"  torch_flash    ERROR (expand={expand}) {errors[-1][:600]}")
            continue
        tflops = work / timing["time_s"] / 1e12
        log(f"  {'torch_flash':14s} {timing['time_s'] * 1e6:10.1f} us {tflops:7.1f} TFLOP/s  err {err:.1e}")
        row = {**timing, "tflops": tflops, "rel_err": err, "expanded_kv": expand, "errors": errors}
        try:
            sampler = torch_peers.torch_sampler(torch, fn, tsets, est_s) if sample else None
        except Exception as e:  # timed once, but no graphs for the interleaved rounds: the row stays, unsampled
            row["sampler_error"] = f"{type(e).__name__}: {str(e)[:700]}"
            log(f"  torch_flash    not in the interleaved rounds: {row['sampler_error'][:600]}")
            sampler = None
        return row, sampler
    return {"error": " / ".join(errors)}, None


def paged_sets(sets: list, seed: int) -> list:
    """The cache as page pools ``[P, K, PAGE_SIZE, D]`` and a permuted block table ``int32[B, S / PAGE_SIZE]``."""

    def pool(x, table):
        batch, kh, max_len, d = x.shape
        pages = x.reshape(batch, kh, max_len // PAGE_SIZE, PAGE_SIZE, d).swapaxes(1, 2)
        flat = pages.reshape(-1, kh, PAGE_SIZE, d)
        return jnp.zeros_like(flat).at[table.reshape(-1)].set(flat)

    out = []
    for q, k, v, starts, lengths, counts in sets:
        batch, pages = k.shape[0], k.shape[2] // PAGE_SIZE
        perm = np.random.default_rng(seed).permutation(batch * pages)
        table = jnp.asarray(perm.reshape(batch, pages), jnp.int32)
        out.append((q, pool(k, table), pool(v, table), table, starts, lengths, counts))
    return out
