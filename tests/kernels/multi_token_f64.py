"""Float64 NumPy reference and random inputs for the flat multi-token attention call (docs/attention.md).

Written from the interface text alone (a loop over sequences, queries and heads), independent of the kernels.
"""

import numpy as np


def multi_token_attention_f64(q, k, v, q_starts, lengths, counts, *, scale=None, window=None, softcap=None):
    """q [T, N, D]; k, v [B, K, S, D]. Query i of sequence b is row q_starts[b] + i at position lengths[b] + i and
    attends to positions max(0, p - window + 1) .. p; rows no sequence owns are 0. float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    num_rows, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    scale = head_dim**-0.5 if scale is None else scale
    out = np.zeros((num_rows, num_heads, head_dim))
    for b, (start, length, count) in enumerate(zip(q_starts, lengths, counts, strict=True)):
        for i in range(int(count)):
            p = int(length) + i
            lo = 0 if window is None else max(0, p - window + 1)
            for n in range(num_heads):
                s = k[b, n // group, lo : p + 1] @ q[int(start) + i, n] * scale
                if softcap is not None:
                    s = softcap * np.tanh(s / softcap)
                w = np.exp(s - s.max())
                out[int(start) + i, n] = w @ v[b, n // group, lo : p + 1] / w.sum()
    return out


def readable(lengths, counts, window, max_len):
    """bool[B, S]: the positions some query of each sequence may read (the rest may hold NaN)."""
    pos = np.arange(max_len)
    lo = np.zeros_like(lengths) if window is None else np.maximum(lengths - window + 1, 0)
    ok = (pos >= lo[:, None]) & (pos < (lengths + counts)[:, None])
    return ok & (counts[:, None] > 0)


def poisoned_inputs(rng, num_rows, num_heads, kv_heads, head_dim, max_len, q_starts, lengths, counts, window):
    """Fresh random q [T, N, D], k, v [B, K, S, D] (float64) with NaN in every cache position no query of its
    sequence may read and in every q row no sequence owns."""
    q_starts, lengths, counts = (np.asarray(x) for x in (q_starts, lengths, counts))
    batch = len(counts)
    q = rng.standard_normal((num_rows, num_heads, head_dim))
    owned = np.zeros(num_rows, bool)
    for start, count in zip(q_starts, counts, strict=True):
        owned[start : start + count] = True
    q[~owned] = np.nan
    ok = readable(lengths, counts, window, max_len)[:, None, :, None]
    k, v = (np.where(ok, rng.standard_normal((batch, kv_heads, max_len, head_dim)), np.nan) for _ in range(2))
    return q, k, v
