"""Pallas GPU kernels for decode and multi-token attention and the decoder's norm, taking and returning plain
arrays (no dependency on ``jkv``). Each kernel has a pure-``jnp`` reference with its signature in
``pallas_kernels.reference``; ``pallas_kernels.backend`` is the one place that picks Mosaic GPU, Triton or
interpret mode."""

from pallas_kernels.block_formats import FORMATS as WEIGHT_FORMATS
from pallas_kernels.block_formats import qmatmul_reference
from pallas_kernels.common import DecodeConfig, decode_config, merge_partials
from pallas_kernels.decode import decode_attention, decode_attention_append
from pallas_kernels.decode_fp8 import (
    fp8_decode_attention,
    fp8_decode_config,
    paged_fp8_config,
    paged_fp8_decode_attention,
)
from pallas_kernels.decode_mgpu import MgpuConfig, decode_attention_mgpu, mgpu_config
from pallas_kernels.decode_q8 import q8_decode_attention, q8_decode_config
from pallas_kernels.dequantize import dequantize_q8
from pallas_kernels.dispatch import decode_attention_auto, prefer_mgpu
from pallas_kernels.multi_token import multi_token_attention
from pallas_kernels.multi_token_args import MultiTokenConfig, multi_token_config
from pallas_kernels.multi_token_mgpu import MgpuMultiTokenConfig, mgpu_multi_token_config, multi_token_attention_mgpu
from pallas_kernels.multi_token_mgpu_paged import multi_token_attention_mgpu_paged
from pallas_kernels.multi_token_mgpu_ws import multi_token_attention_mgpu_ws
from pallas_kernels.multi_token_paged import paged_multi_token_attention
from pallas_kernels.multi_token_quant import (
    fp8_multi_token_attention,
    paged_fp8_multi_token_attention,
    paged_q8_multi_token_attention,
    q8_multi_token_attention,
)
from pallas_kernels.paged import PagedConfig, paged_config, paged_decode_attention
from pallas_kernels.paged_q8 import paged_q8_config, paged_q8_decode_attention
from pallas_kernels.quantized_matmul import QMatmulConfig, qmatmul, qmatmul_config
from pallas_kernels.reference import (
    decode_attention_append_reference,
    decode_attention_reference,
    dequantize_q8_reference,
    fp8_decode_attention_reference,
    fp8_multi_token_attention_reference,
    merge_partials_reference,
    multi_token_attention_reference,
    paged_decode_attention_reference,
    paged_fp8_decode_attention_reference,
    paged_fp8_multi_token_attention_reference,
    paged_multi_token_attention_reference,
    paged_q8_decode_attention_reference,
    paged_q8_multi_token_attention_reference,
    q8_decode_attention_reference,
    q8_multi_token_attention_reference,
    residual_rms_norm_reference,
)
from pallas_kernels.rms_norm import residual_rms_norm

__all__ = [
    "WEIGHT_FORMATS",
    "DecodeConfig",
    "MgpuConfig",
    "MgpuMultiTokenConfig",
    "MultiTokenConfig",
    "PagedConfig",
    "QMatmulConfig",
    "decode_attention",
    "decode_attention_append",
    "decode_attention_append_reference",
    "decode_attention_auto",
    "decode_attention_mgpu",
    "decode_attention_reference",
    "decode_config",
    "dequantize_q8",
    "dequantize_q8_reference",
    "fp8_decode_attention",
    "fp8_decode_attention_reference",
    "fp8_decode_config",
    "fp8_multi_token_attention",
    "fp8_multi_token_attention_reference",
    "merge_partials",
    "merge_partials_reference",
    "mgpu_config",
    "mgpu_multi_token_config",
    "multi_token_attention",
    "multi_token_attention_mgpu",
    "multi_token_attention_mgpu_paged",
    "multi_token_attention_mgpu_ws",
    "multi_token_attention_reference",
    "multi_token_config",
    "paged_config",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "paged_fp8_config",
    "paged_fp8_decode_attention",
    "paged_fp8_decode_attention_reference",
    "paged_fp8_multi_token_attention",
    "paged_fp8_multi_token_attention_reference",
    "paged_multi_token_attention",
    "paged_multi_token_attention_reference",
    "paged_q8_config",
    "paged_q8_decode_attention",
    "paged_q8_decode_attention_reference",
    "paged_q8_multi_token_attention",
    "paged_q8_multi_token_attention_reference",
    "prefer_mgpu",
    "q8_decode_attention",
    "q8_decode_attention_reference",
    "q8_decode_config",
    "q8_multi_token_attention",
    "q8_multi_token_attention_reference",
    "qmatmul",
    "qmatmul_config",
    "qmatmul_reference",
    "residual_rms_norm",
    "residual_rms_norm_reference",
]
