"""bench/bench_qweights.py's row variants: the suffixes a decode row's name may carry and what each changes
(the model's options, the products' launch rule, the rounding form, the q/k/v packing), and the context managers
that apply them while a row's program is traced."""

from __future__ import annotations

import contextlib
import sys
from unittest import mock

from jkv.models import llama, quant
from pallas_kernels import block_formats, qmatmul_act, qmatmul_configs
from pallas_kernels import quantized_matmul as qm

MGPU = "_mgpu"  # a decode row named with this suffix runs its model with weights_impl="mgpu" (Mosaic GPU products)
ACT_XLA = "_actx"  # a dp4a decode row with this suffix rounds its activations in XLA's fusions (qmatmul_act)
SLICES = "_slices"  # a decode row with this: q, k and v sliced before attention (LlamaOptions.pack_qkv=False)
PLAIN_NORM = "_plainnorm"  # a dp4a decode row with this: the norms in XLA's fusions (LlamaOptions.norm_kernel=False)
NORM_KERNEL = "_normk"  # a dp4a decode row with this: the norm kernel, which rounds wqkv's and w_gate_up's inputs
RULE2X = "_rule2x"  # a dp4a decode row with this: the launch before (twice the K splits of 2 programs a multiprocessor)
STEPS2 = "_steps2"  # a dp4a decode row with this: at most 2 K steps a program (qmatmul_configs.DP4A_MAX_STEPS = 2)
MID_DEQUANT = "_middeq"  # a dp4a decode row with this: 5-127 rows dequantize the matrix (quant.DP4A_MID_ROWS)


def options_of(name: str) -> llama.LlamaOptions:
    """The model options of row ``name`` (its suffix)."""
    if name.endswith(MGPU):
        return llama.LlamaOptions(weights_impl="mgpu")
    if name.endswith(PLAIN_NORM):
        return llama.LlamaOptions(norm_kernel=False)
    if name.endswith(SLICES):
        return llama.LlamaOptions(pack_qkv=False)
    return llama.LlamaOptions(norm_kernel=True) if name.endswith(NORM_KERNEL) else llama.DEFAULT_OPTIONS


def with_dp4a_rows(models: dict, keep=None) -> dict:
    """``models`` and each quantized one again as ``<name>_dp4a``: its projections in the integer-dot kernel's
    layout (``quant.to_dp4a_layout``; decode steps of up to quant.DP4A_MAX_ROWS rows run that kernel).
    ``keep``: convert only the rows named there, alone or with a suffix (None: all; each conversion is another copy
    of the weights)."""
    wanted = lambda name: name != "bf16" and (keep is None or any(k.startswith(f"{name}_dp4a") for k in keep))
    return models | {f"{name}_dp4a": quant.to_dp4a_layout(p) for name, p in models.items() if wanted(name)}


def with_act_rows(models: dict) -> dict:
    """``models`` and each dp4a-layout one again as ``<name>_actx`` (the same params; its step compiled with
    ``qmatmul_act.ROUNDING = "xla"``: the activations rounded by XLA's fusions), as ``<name>_normk`` (the norm
    kernel rounding the inputs of wqkv and w_gate_up in its launch: ``LlamaOptions.norm_kernel``) and as
    ``<name>_rule2x`` (the products' launch before ``qmatmul_configs.DP4A_PROGRAMS``: twice the K splits of the
    rule of 2 programs a multiprocessor), and as ``<name>_steps2`` (at most 2 K steps a program: more splits of
    Q8_0's gate_up and LM head), ``<name>_plainnorm`` (the norms in XLA's fusions: the default before the norm
    kernel rounded) and ``<name>_middeq`` (products of 5-127 rows dequantizing the matrix for one dot,
    ``quant.DP4A_MID_ROWS = "dequantize"``: the default before they ran the row layout's kernel)."""
    dp4a = {name: p for name, p in models.items() if name.endswith("_dp4a")}
    tails = (ACT_XLA, NORM_KERNEL, PLAIN_NORM, RULE2X, STEPS2, MID_DEQUANT)
    return models | {f"{name}{tail}": p for name, p in dp4a.items() for tail in tails}


def dp4a_rule2x(m: int, n: int, k: int, fmt: str) -> qm.QMatmulConfig:
    """The dp4a launch before ``qmatmul_configs.DP4A_PROGRAMS``: twice the default split rule's K splits (2
    programs a multiprocessor, the most dividing splits not past it) where the steps divide by them."""
    config = qm.dp4a_config(m, n, k, fmt)
    steps = k // block_formats.block_format(fmt).parts // config.block_k
    return config._replace(num_splits=qm.doubled_default_splits(m, n, steps, config.block_m, config.block_n))


@contextlib.contextmanager
def row_settings(name: str):
    """The activation rounding and the dp4a launch of row ``name`` while inside (its program is compiled there and
    keeps them)."""
    rounding = "xla" if ACT_XLA in name else qmatmul_act.ROUNDING
    launch = dp4a_rule2x if RULE2X in name else quant.DP4A_LAUNCH
    steps = 2 if STEPS2 in name else qmatmul_configs.DP4A_MAX_STEPS
    with (
        mock.patch.object(quant, "DP4A_MID_ROWS", "dequantize" if MID_DEQUANT in name else quant.DP4A_MID_ROWS),
        mock.patch.object(qmatmul_act, "ROUNDING", rounding),
        mock.patch.object(quant, "DP4A_LAUNCH", launch),
        mock.patch.object(qmatmul_configs, "DP4A_MAX_STEPS", steps),
    ):
        yield


def with_mgpu_rows(models: dict) -> dict:
    """``models`` and, where Mosaic GPU runs, each quantized one again as ``<name>_mgpu`` (the same params)."""
    from pallas_kernels import backend

    if not backend.mosaic_gpu_usable():
        return models
    return models | {f"{name}{MGPU}": params for name, params in models.items() if name != "bf16"}


@contextlib.contextmanager
def launch_rule(variant: str | None):
    """Quantized products launched as ``variant`` while inside: None, the default rule; ``"units"``: at most
    ``FMA_ROWS`` rows on the register path (``quantized_matmul.units_config``); ``"kernel"``: the Triton kernel at
    every row count (prefill too: no ``quant.DEQUANT_MIN_ROWS`` hand-over); ``"expand"``: that, with more than
    ``SMALL_DOT_ROWS`` rows on the default tile with ``dot_expand``'s dequantization; ``"deqk"``: the default rule,
    prefill-sized products dequantizing their matrix in one kernel launch (``quant.DEQUANT_IMPL = "kernel"``)."""
    default, handover, dequant = qm.qmatmul_config, quant.DEQUANT_MIN_ROWS, quant.DEQUANT_IMPL
    if variant in ("kernel", "expand"):
        quant.DEQUANT_MIN_ROWS = sys.maxsize
    if variant == "deqk":
        quant.DEQUANT_IMPL = "kernel"
    if variant == "units":
        qm.qmatmul_config = lambda m, n, k, fmt: (qm.units_config if m <= qm.FMA_ROWS else default)(m, n, k, fmt)
    elif variant == "expand":
        qm.qmatmul_config = lambda m, n, k, fmt: (
            default(m, n, k, fmt)._replace(path="dot_expand") if m > qm.SMALL_DOT_ROWS else default(m, n, k, fmt)
        )
    elif variant not in (None, "kernel", "deqk"):
        raise ValueError(f"launch rule {variant!r}: expected None, 'units', 'kernel', 'expand' or 'deqk'")
    try:
        yield
    finally:
        qm.qmatmul_config, quant.DEQUANT_MIN_ROWS, quant.DEQUANT_IMPL = default, handover, dequant
