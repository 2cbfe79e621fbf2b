"""Plain NumPy float64 models used as independent references by the tests."""

import numpy as np


def attention_f64(q, k, v, q_positions, scale=None, window=None, softcap=None):
    """q [B, T, N, D]; k, v [B, K, S, D]; query (b, t) attends positions 0..q_positions[b, t] (the last
    ``window`` of them); scores capped as softcap * tanh(s / softcap). float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, n, d = q.shape
    kh = k.shape[1]
    g = n // kh
    scale = d**-0.5 if scale is None else scale
    out = np.zeros((b, t, n, d))
    for bi in range(b):
        for ti in range(t):
            upto = int(q_positions[bi, ti]) + 1
            if upto <= 0:
                continue
            lo = 0 if window is None else max(0, upto - window)
            for h in range(n):
                kv = h // g
                s = k[bi, kv, lo:upto] @ q[bi, ti, h] * scale
                if softcap is not None:
                    s = softcap * np.tanh(s / softcap)
                p = np.exp(s - s.max())
                out[bi, ti, h] = p @ v[bi, kv, lo:upto] / p.sum()
    return out


def decode_attention_f64(q, k, v, lengths, scale=None, window=None, softcap=None):
    """q [B, N, D]: one query per sequence at position lengths[b] - 1 (none for a length 0: output zero)."""
    lengths = np.asarray(lengths)
    return attention_f64(np.asarray(q)[:, None], k, v, lengths[:, None] - 1, scale, window, softcap)[:, 0]


def rope_f64(x, positions, theta, style):
    """x [B, T, H, D], positions [B, T]. NEOX pairs i with i + D/2, NORM pairs 2i with 2i + 1."""
    x = np.asarray(x, np.float64)
    d = x.shape[-1]
    out = np.empty_like(x)
    for i in range(d // 2):
        ang = np.asarray(positions, np.float64)[..., None] * theta ** (-2.0 * i / d)
        c, s = np.cos(ang), np.sin(ang)
        a, b = (i, i + d // 2) if style == "neox" else (2 * i, 2 * i + 1)
        out[..., a] = x[..., a] * c - x[..., b] * s
        out[..., b] = x[..., b] * c + x[..., a] * s
    return out


def multi_token_attention_f64(q, k, v, q_starts, lengths, counts, scale=None, window=None, softcap=None):
    """The flat multi-token step in float64: q [T, N, D]; k, v [B, K, S, D]. Query i < counts[b] of sequence b
    is row q_starts[b] + i at position p = lengths[b] + i and attends to positions max(0, p - window + 1)..p;
    scores c * tanh(scale * q.k / c) with softcap c. Rows no sequence owns are 0. Reads only those positions."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    t, n, d = q.shape
    kh = k.shape[1]
    g = n // kh
    scale = d**-0.5 if scale is None else scale
    out = np.zeros((t, n, d))
    for b in range(len(counts)):
        for i in range(int(counts[b])):
            p = int(lengths[b]) + i
            lo = 0 if window is None else max(0, p - window + 1)
            keys, values = k[b, :, lo : p + 1], v[b, :, lo : p + 1]  # (K, W, D)
            qs = q[int(q_starts[b]) + i].reshape(kh, g, d)
            s = np.einsum("kgd,kwd->kgw", qs, keys) * scale
            if softcap is not None:
                s = softcap * np.tanh(s / softcap)
            e = np.exp(s - s.max(axis=-1, keepdims=True))
            out[int(q_starts[b]) + i] = (np.einsum("kgw,kwd->kgd", e, values) / e.sum(-1)[..., None]).reshape(n, d)
    return out
