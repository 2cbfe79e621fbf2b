"""Argument checks the attention kernels and their references share: types and ranges of the step's integers, the
q/k/v triple (:func:`check_kv`), block tables, the contiguous decode call (:func:`check_args`), window, softcap,
softmax scale and launch overrides. Errors name the bad value and what was expected."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

HEAD_DIMS = (16, 32, 64, 128, 256)  # power-of-two tiles; 64 and 128 are the tested and tuned ones
MAX_HEAD_DIM = 256
CACHE_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
NUM_WARPS = (1, 2, 4, 8, 16)


def is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def concrete(x):
    """``x`` as a NumPy array, or ``None`` when it is traced (then it cannot be range-checked)."""
    return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


def check_int_vector(name: str, x, batch: int):
    """``x`` int ``[B]``; its values as NumPy, or None when traced."""
    if getattr(x, "shape", None) != (batch,) or not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be int[{batch}], got {getattr(x, 'dtype', None)}{getattr(x, 'shape', None)}")
    return concrete(x)


def check_lengths(lengths, batch: int, max_len: int, bound: str) -> None:
    """``lengths`` int ``[B]``; concrete values in ``[0, max_len]`` (``bound`` spells the bound out)."""
    value = check_int_vector("lengths", lengths, batch)
    if value is not None and (value.min(initial=0) < 0 or value.max(initial=0) > max_len):
        raise ValueError(f"lengths={value} must lie in [0, {bound}]")


def check_layer(layer, num_layers: int) -> None:
    """``layer`` an int or an integer scalar; concrete values in ``[0, num_layers)``."""
    if isinstance(layer, (bool, float)) or not (
        is_int(layer) or (hasattr(layer, "dtype") and jnp.issubdtype(layer.dtype, jnp.integer))
    ):
        raise TypeError(f"layer must be an int or an integer scalar, got {layer!r}")
    if getattr(layer, "shape", ()) != ():
        raise ValueError(f"layer must be a scalar, got shape {layer.shape}")
    value = concrete(layer)
    if value is not None and not 0 <= int(value) < num_layers:
        raise ValueError(f"layer={int(value)} out of range for num_layers={num_layers}")


def check_kv(q, k, v, layer, *, q_axes: str, axes: str, layer_needs: str, names=("k", "v"), dtypes=CACHE_DTYPES):
    """What every attention kernel checks first: ``q`` 3-D (``q_axes`` spells its axes) and floating; ``k`` and ``v``
    (``names``) of one shape, ``axes`` or ``[L, *axes]``, with ``layer`` exactly for the latter (``layer_needs``
    says what a layer needs, in the error) and in range; one dtype (among ``dtypes`` unless None); head_dim equal
    to ``q``'s, kv heads dividing query heads. Returns ``(q.shape, k.shape[-4:])``."""
    kn, vn = names
    if getattr(q, "ndim", None) != 3:
        raise ValueError(f"q must have shape {q_axes}, got {getattr(q, 'shape', None)}")
    kshape, vshape = getattr(k, "shape", None), getattr(v, "shape", None)
    if kshape is None or len(kshape) not in (4, 5) or vshape != kshape:
        raise ValueError(f"{kn} and {vn} must both have shape {axes} or [L, {axes[1:]}, got {kshape} and {vshape}")
    if len(kshape) == 5 and layer is None:
        raise ValueError(f"{kn}.shape={kshape} holds every layer [L, {axes[1:]}: pass layer=")
    if len(kshape) == 4 and layer is not None:
        raise ValueError(f"layer={layer!r} {layer_needs}, got {kn}.shape={kshape}")
    if k.dtype != v.dtype or (dtypes is not None and jnp.dtype(k.dtype) not in dtypes):
        among = "" if dtypes is None else f" among {[str(d) for d in dtypes]}"
        raise TypeError(f"{kn} and {vn} must share a dtype{among}, got {k.dtype}, {v.dtype}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise TypeError(f"q must be a floating array, got dtype {q.dtype}")
    num_heads, kv_heads, head_dim = q.shape[1], kshape[-3], kshape[-1]
    if head_dim != q.shape[2]:
        raise ValueError(f"q.shape={q.shape} does not match {kn}.shape={kshape} (head_dim must agree)")
    if kv_heads < 1 or num_heads % kv_heads:
        raise ValueError(f"num_q_heads={num_heads} must be a multiple of num_kv_heads={kv_heads}")
    if layer is not None:
        check_layer(layer, kshape[0])
    return q.shape, kshape[-4:]


def check_block_tables(block_tables, batch: int, num_pages: int, page_size: int, first=None, end=None, why=None):
    """``block_tables`` int ``[B, M]``; where the table and the (concrete) positions ``[first[b], end[b])`` that
    sequence ``b`` reads are known, each entry covering them names a page of the pool (``why(b)`` says who reads
    it); entries outside may be anything (a ring's released pages)."""
    tshape = getattr(block_tables, "shape", None)
    if tshape is None or len(tshape) != 2 or tshape[0] != batch or not jnp.issubdtype(block_tables.dtype, jnp.integer):
        raise ValueError(f"block_tables must be int[{batch}, M], got {getattr(block_tables, 'dtype', None)}{tshape}")
    tables = concrete(block_tables)
    if tables is None or first is None or end is None:
        return
    column = np.arange(tshape[1])[None, :]
    read = (column >= first[:, None] // page_size) & (column < -(-end[:, None] // page_size))
    bad = read & ((tables < 0) | (tables >= num_pages))
    if bad.any():
        b0, m0 = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"block_tables[{b0}, {m0}]={int(tables[b0, m0])} must name a page in [0, {num_pages}): {why(b0)}"
        )


def takes_head_dim(head_dim: int, chunked: bool = False) -> bool:
    """Whether a decode kernel takes ``head_dim``: one of :data:`HEAD_DIMS`, or with ``chunked`` (the Triton decode
    kernels, bf16 / f32, Q8 and FP8, which read the columns in power-of-two chunks: ``common.column_slices``) any
    multiple of 16 up to :data:`MAX_HEAD_DIM` (48, 80, 96, ...; Q8 codes: multiples of 32)."""
    if chunked:
        return head_dim % 16 == 0 and 16 <= head_dim <= MAX_HEAD_DIM
    return head_dim in HEAD_DIMS


def check_head_dim(head_dim: int, chunked: bool = False) -> None:
    if not takes_head_dim(head_dim, chunked):
        expected = f"a multiple of 16 in [16, {MAX_HEAD_DIM}]" if chunked else f"one of {HEAD_DIMS}"
        raise ValueError(f"head_dim={head_dim} is not supported; expected {expected}")


def check_args(q, k, v, lengths, layer=None, *, chunked: bool = False) -> tuple[int, int, int, int, int]:
    """Validate the arguments of a contiguous decode kernel (and of its reference); return ``(B, N, K, S, D)``.
    ``chunked``: the kernel reads the columns in chunks (:func:`takes_head_dim`).

    Concrete lengths and layer are range-checked; traced ones cannot be (the kernel clamps them in bounds).
    """
    whole = "needs a whole [L, B, K, S, D] cache"
    (b, n, d), (bk, kh, s, _) = check_kv(q, k, v, layer, q_axes="[B, N, D]", axes="[B, K, S, D]", layer_needs=whole)
    if bk != b:
        raise ValueError(f"q.shape={q.shape} does not match k.shape={k.shape} (batch and head_dim must agree)")
    check_head_dim(d, chunked)
    check_lengths(lengths, b, s, f"S={s}")
    return b, n, kh, s, d


def check_window_softcap(window, softcap) -> None:
    """``window`` (positions a query sees, itself included) None or an int >= 1; ``softcap`` None or a Python
    number > 0 (both static kernel parameters)."""
    if window is not None and (not is_int(window) or window < 1):
        raise ValueError(f"window={window!r} must be None or an int >= 1")
    if softcap is not None:
        if not isinstance(softcap, (int, float, np.floating, np.integer)) or isinstance(softcap, bool):
            raise TypeError(f"softcap must be None or a Python number, got {softcap!r}")
        if not softcap > 0:
            raise ValueError(f"softcap={softcap} must be > 0")


def softmax_scale(scale, head_dim: int) -> float:
    """The softmax scale of a decode call: ``head_dim ** -0.5`` for None, else ``scale``, a Python number (it
    is a static kernel parameter)."""
    if scale is None:
        return head_dim**-0.5
    if not isinstance(scale, (int, float, np.floating)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a Python number, got {scale!r}")
    return float(scale)


def check_flag(name: str, value):
    """``value`` of a bool launch override (None keeps the default); a clear error for anything else."""
    if value is not None and not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_launch_overrides(*, num_warps=None, **ints) -> None:
    """Types and ranges of the launch overrides the Triton decode kernels share (None keeps a default): integers,
    ``num_splits`` / ``num_stages`` >= 1, ``num_warps`` in ``NUM_WARPS``. Each kernel checks its own block size."""
    for name, value in {**ints, "num_warps": num_warps}.items():
        if value is not None and not is_int(value):
            raise TypeError(f"{name} must be an int, got {value!r}")
    for name in ("num_splits", "num_stages"):
        if ints.get(name) is not None and ints[name] < 1:
            raise ValueError(f"{name}={ints[name]} must be >= 1")
    if num_warps is not None and num_warps not in NUM_WARPS:
        raise ValueError(f"{num_warps=} must be one of {NUM_WARPS}")


# ----------------------------------------------------------------------------------------------- Q8 pairs

Q8_BLOCK = 32  # values per scale of the Q8 format
Q8_SCALE_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def check_q8(name: str, codes, scales) -> None:
    """``codes`` int8 ``[..., D]`` with ``D`` a multiple of 32 and ``scales [..., D // 32]`` of a scale dtype."""
    if getattr(codes, "dtype", None) != jnp.int8:
        raise TypeError(f"{name} codes must be int8, got {getattr(codes, 'dtype', type(codes).__name__)}")
    if getattr(scales, "dtype", None) not in Q8_SCALE_DTYPES:
        raise TypeError(
            f"{name} scales must be float16 or float32, got {getattr(scales, 'dtype', type(scales).__name__)}"
        )
    d = codes.shape[-1] if codes.ndim else 0
    if codes.ndim == 0 or d % Q8_BLOCK or scales.shape != (*codes.shape[:-1], d // Q8_BLOCK):
        raise ValueError(
            f"{name}: codes.shape={codes.shape} and scales.shape={scales.shape} do not form a Q8 pair "
            f"(D a multiple of {Q8_BLOCK}, scales of shape codes.shape[:-1] + (D // {Q8_BLOCK},))"
        )


def check_q8_pair(name: str, codes, scales) -> jax.ShapeDtypeStruct:
    """:func:`check_q8`; a stand-in of the values, for the checks of a bf16 cache."""
    check_q8(name, codes, scales)
    return jax.ShapeDtypeStruct(codes.shape, jnp.bfloat16)


def check_pairs(check, k, k_scale, v, v_scale, names=("k", "v")):
    """Both pairs of a quantized cache through ``check(name, values, scales)`` (:func:`check_q8_pair`, or
    ``multi_token_args.check_fp8_pair``); they must agree in shape and scale dtype. Returns what ``check`` gives."""
    k_vals, v_vals = check(names[0], k, k_scale), check(names[1], v, v_scale)
    if v.shape != k.shape or v_scale.shape != k_scale.shape or v_scale.dtype != k_scale.dtype:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same shape and scale dtype, got "
            f"{k.shape}/{k_scale.shape}/{k_scale.dtype} and {v.shape}/{v_scale.shape}/{v_scale.dtype}"
        )
    return k_vals, v_vals
