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


def decode_attention_f64(q, k, v, lengths, scale=None):
    lengths = np.asarray(lengths)
    return attention_f64(np.asarray(q)[:, None], k, v, lengths[:, None] - 1, scale)[:, 0]


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
