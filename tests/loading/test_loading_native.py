"""GGUF block formats kept on the device (``load_gguf(weights="native")``): the repacked planes hold exactly the
values gguf-py dequantizes; tiny GGUF files give the logits of their dequantized load; the shipped SmolLM2 Q4_1
model takes about its file's bytes and gives the dequantized float32 model's greedy tokens; option errors."""

import functools
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from gguf import GGMLQuantizationType as Q
from helpers_loading import needs_smollm, smollm_path, write_tiny_gguf
from helpers_smollm import load_shared

import jkv
from jkv.loading import ModelLoadError, gguf_blocks, load, load_gguf
from jkv.models import llama, quant
from jkv.serving.generator import Generator
from pallas_kernels import block_formats

F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q6_K": (208,)}


@pytest.mark.parametrize("fmt", list(block_formats.FORMATS))
def test_repacked_planes_hold_what_gguf_dequantizes(rng, fmt):
    """Random blocks (every bit pattern of codes and 6-bit scales, f16 scales and mins of both signs)."""
    block, size = block_formats.FORMATS[fmt].block, gguf_blocks.BLOCK_BYTES[fmt]
    n, k = 7, 3 * block
    raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    for offset in F16_FIELDS[fmt]:
        values = rng.standard_normal((n, k // block, 1)).astype(np.float16)
        raw[..., offset : offset + 2] = values.view(np.uint8)
    raw = raw.reshape(n, -1)
    planes = gguf_blocks.repack(raw, fmt, n, k)
    assert tuple(p.shape for p in planes) == block_formats.plane_shapes(fmt, n, k)
    want = gguf.quants.dequantize(raw, Q[fmt]).reshape(n, k)
    np.testing.assert_array_equal(np.asarray(block_formats.dequantize(planes, fmt)), want)
    with pytest.raises(ValueError, match=f"is not a {n} x {2 * k} matrix"):
        gguf_blocks.repack(raw, fmt, n, 2 * k)


UNIFORM = {
    "attn_q": Q.Q4_K, "attn_k": Q.Q4_K, "attn_v": Q.Q4_K, "attn_output": Q.Q6_K, "ffn_gate": Q.Q4_0,
    "ffn_up": Q.Q4_0, "ffn_down": Q.Q4_1, "token_embd": Q.Q8_0, "output": Q.Q6_K,
}  # fmt: skip
MIXED = {
    "attn_q": Q.Q8_0,
    "attn_k": Q.Q4_K,
    "attn_v": Q.Q4_0,
    "attn_output": Q.Q4_1,
    "ffn_up": Q.F16,
    "token_embd": Q.Q8_0,
}


@functools.cache
def tiny_forward(config):
    return jax.jit(functools.partial(llama.forward, config=config))


@pytest.mark.parametrize("types,layout", [(UNIFORM, "stacked"), (MIXED, "layers")], ids=["uniform", "mixed"])
def test_tiny_native_gguf_gives_the_dequantized_logits(tmp_path, rng, types, layout):
    """Every matrix whose fused group shares one block format stays quantized; the logits are the dequantized
    model's (float32, up to summation order). A group of mixed formats (q/k/v here) is dequantized at load."""
    write_tiny_gguf(tmp_path / "m.gguf", rng, types=types)
    native = load_gguf(tmp_path / "m.gguf", "f32", progress=False, layout=layout, weights="native")
    dense = load_gguf(tmp_path / "m.gguf", "f32", progress=False, layout=layout)
    layer = native.params.layers if layout == "stacked" else native.params.layers[0]
    kept = {name: getattr(layer, name).format for name in ("wqkv", "wo", "w_gate_up", "w_down") if
            quant.is_quantized(getattr(layer, name))}  # fmt: skip
    if types is UNIFORM:
        assert kept == {"wqkv": "Q4_K", "wo": "Q6_K", "w_gate_up": "Q4_0", "w_down": "Q4_1"}
        assert native.params.lm_head.format == "Q6_K"
    else:
        assert kept == {"wo": "Q4_1"}
    assert native.params.embed.format == "Q8_0" and native.info["weights"] == "native"
    c = native.config
    tokens = jnp.asarray(rng.integers(0, c.vocab_size, (2, 6)), jnp.int32)
    cache = jkv.KVCache.init(jkv.CacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, 16), 2)
    got, _ = tiny_forward(c)(native.params, cache, tokens)
    want, _ = tiny_forward(c)(dense.params, cache, tokens)
    assert rel_err(got, want) < 1e-5
    assert native.params.nbytes < dense.params.nbytes / (3 if types is UNIFORM else 1)


def test_tiny_native_gguf_in_the_dp4a_layout(tmp_path, rng):
    """``weight_layout="dp4a"``: the projections of the formats the integer-dot kernel takes are laid out for it
    (Q6_K and the embedding keep their rows); a prefill gives the row layout's logits, a decode step (the kernel,
    interpret mode here) the same within the activations' int8 rounding."""
    write_tiny_gguf(tmp_path / "m.gguf", rng, types=UNIFORM)
    rows = load(tmp_path / "m.gguf", "f32", progress=False, layout="layers", weights="native")
    laid = load(tmp_path / "m.gguf", "f32", progress=False, layout="layers", weights="native", weight_layout="dp4a")
    layer = laid.params.layers[0]
    assert {name: getattr(layer, name).layout for name in ("wqkv", "wo", "w_gate_up", "w_down")} == {
        "wqkv": "dp4a", "wo": "rows", "w_gate_up": "dp4a", "w_down": "dp4a"
    }  # fmt: skip
    assert laid.params.embed.layout == "rows" and laid.params.nbytes == rows.params.nbytes
    c = laid.config
    forward = jax.jit(functools.partial(llama.forward, config=c, options=llama.LlamaOptions(impl="pallas")))
    cache = jkv.KVCache.init(jkv.CacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, 16), 2)
    for length, tol in ((9, 1e-5), (1, 0.02)):
        tokens = jnp.asarray(rng.integers(0, c.vocab_size, (2, length)), jnp.int32)
        got, want = forward(laid.params, cache, tokens)[0], forward(rows.params, cache, tokens)[0]
        assert rel_err(got, want) < tol, length


def test_weight_options_are_checked(tmp_path, rng):
    write_tiny_gguf(tmp_path / "m.gguf", rng)
    with pytest.raises(ValueError, match="weight_layout='dp4a' lays out quantized weights"):
        load(tmp_path / "m.gguf", progress=False, weight_layout="dp4a")
    with pytest.raises(ValueError, match="weight_layout='cols' is not one of"):
        load(tmp_path / "m.gguf", progress=False, weights="native", weight_layout="cols")
    with pytest.raises(ValueError, match="weights='bf16' is not one of"):
        load_gguf(tmp_path / "m.gguf", progress=False, weights="bf16")
    with pytest.raises(ValueError, match="quantize='q8_0' applies to safetensors"):
        load(tmp_path / "m.gguf", progress=False, quantize="q8_0")
    with pytest.raises(ValueError, match="weights='native' applies to GGUF"):
        load(tmp_path, progress=False, weights="native")


@pytest.mark.parametrize("weights", ["dequantize", "native"])
def test_values_past_float16_are_refused_either_way(tmp_path, rng, weights):
    """One Q8_0 block of ``1000 * 127``: finite float16 planes, values past float16. A float16 load refuses the file
    whether it dequantizes or keeps the blocks (whose products would compute in float16); float32 takes it."""
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, rng, types={"attn_q": Q.Q8_0, "attn_k": Q.Q8_0, "attn_v": Q.Q8_0})
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.1.attn_k.weight")
    raw = bytearray(path.read_bytes())
    raw[t.data_offset : t.data_offset + 3] = np.float16(1000).tobytes() + bytes([127])
    path.write_bytes(raw)
    with pytest.raises(ModelLoadError, match=r"'blk\.1\.attn_k\.weight' .* values up to 1\.27e\+05, beyond float16"):
        load_gguf(path, "f16", progress=False, weights=weights)
    assert load_gguf(path, "f32", progress=False, weights=weights).params.nbytes > 0


QUESTIONS = (
    "Name three colors of the rainbow.",
    "What does a bee make?",
    "Give me a word that rhymes with cat.",
    "How many legs does a spider have?",
)


@pytest.mark.slow
@needs_smollm
@pytest.mark.usefixtures("optimized")
def test_smollm2_native_weights_fit_the_file_and_keep_greedy_tokens():
    """Q4_1 blocks and the Q8_0 embedding stay quantized: the params take <= 1.2x the file's bytes, and 8 greedy
    tokens for each of four prompts (one ragged batch) equal those of the model of the dequantized float32
    values (``dequantize_params``: exactly what ``weights="dequantize"`` loads, as the repack test shows)."""
    path = smollm_path()
    model = load_shared(path, "f32", weights="native")
    params = model.params
    assert params.layers.wqkv.format == "Q4_1" and params.embed.format == "Q8_0"
    assert params.nbytes <= 1.2 * os.path.getsize(path)
    tok = model.tokenizer
    prompts = [tok.encode(tok.render_chat([{"role": "user", "content": q}])) for q in QUESTIONS]
    results = []
    for p in (params, jax.jit(quant.dequantize_params)(params)):  # one program, not one per eager op and shape
        generator = Generator(model.config, p, max_len=64, batch=len(prompts))
        results.append(generator.generate(prompts, max_new_tokens=8, stop_ids=()).tokens)
    assert results[0] == results[1], [tok.decode(t) for t in results[0]]


@pytest.mark.gpu
@needs_smollm
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU: the qmatmul kernels in the model")
def test_smollm2_native_weights_through_the_kernels_on_gpu():
    """On a GPU the model's products run the qmatmul kernels (float32 activations: the register path for decode,
    the dot path at full precision for prefill): the same greedy tokens as the dequantized float32 model."""
    model = load_gguf(smollm_path(), "f32", progress=False, weights="native")
    tok = model.tokenizer
    prompts = [tok.encode(tok.render_chat([{"role": "user", "content": q}])) for q in QUESTIONS]
    results = []
    for p in (model.params, quant.dequantize_params(model.params)):
        generator = Generator(model.config, p, max_len=96, batch=len(prompts))
        results.append(generator.generate(prompts, max_new_tokens=32, stop_ids=()).tokens)
    assert results[0] == results[1], [tok.decode(t) for t in results[0]]
