"""Quantizing at load (``jkv.loading.quantize``): Q8_0 and Q4_K planes hold their input within the error bounds
the module states, Q8_0 agrees with gguf-py's quantizer to one code step, the plan of formats, errors; and a
small random HF model loaded with ``quantize=`` keeps the float model's logits within the quantization error and
its greedy choices on most positions."""

import functools
import re

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from gguf import GGMLQuantizationType as Q
from qweight_inputs import dequantize_f64

import jkv
from jkv.loading import ModelLoadError, load_safetensors
from jkv.loading import quantize as qz
from jkv.models import llama, quant


def weights(rng, n, k):
    """Rows of mixed scale, an all-zero block and one all-positive block (its offset must stay 0)."""
    w = rng.standard_normal((n, k)) * rng.uniform(0.01, 2.0, (n, 1))
    w[0, :32] = 0.0
    w[1, :32] = np.abs(w[1, :32]) + 0.5
    return w.astype(np.float32)


def test_q8_0_error_is_half_a_step(rng):
    w = weights(rng, 6, 96)
    codes, scales = qz.quantize_q8_0(w)
    got = dequantize_f64((codes, scales), "Q8_0")
    step = np.repeat(scales.astype(np.float64), 32, axis=1)
    assert (np.abs(got - w) <= step / 2 + np.abs(w) * 2.0**-11).all()
    theirs = gguf.quants.dequantize(gguf.quants.quantize(w, Q.Q8_0), Q.Q8_0).reshape(w.shape)
    assert (np.abs(got - theirs) <= step * 1.01).all()  # llama.cpp rounds x * (1/scale) at f32: one step apart at most


def test_q4_k_error_is_about_half_a_step(rng):
    w = weights(rng, 5, 512)
    planes = qz.quantize_q4_k(w)
    got = dequantize_f64(planes, "Q4_K")
    _, sc, _, d, dmin = (p.astype(np.float64) for p in planes)
    step = np.repeat(sc, 32, axis=1) * np.repeat(d, 256, axis=1)
    slack = np.repeat(dmin, 256, axis=1)
    assert (np.abs(got - w) <= step / 2 + slack + 1e-7).all()
    np.testing.assert_array_equal(got[0, :32], 0.0)
    assert rel_err(got, w) < 0.1


@pytest.mark.parametrize(
    "name,k,choice,want",
    [
        ("3.q", 512, "q4_k", "Q4_K"),
        ("3.down", 96, "q4_k", "Q8_0"),  # no 256-block fits K = 96
        ("0.o", 48, "q8_0", None),  # nor a 32-block
        ("embed", 512, "q4_k", "Q8_0"),
        ("lm_head", 512, "q8_0", "Q8_0"),
        ("2.attn_norm", 512, "q8_0", None),
        ("1.q_bias", 512, "q8_0", None),
    ],
)
def test_plan(name, k, choice, want):
    assert qz.plan(name, k, choice) == want


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="multiple of 256"):
        qz.quantize_q4_k(np.ones((2, 128), np.float32))
    with pytest.raises(ValueError, match="finite"):
        qz.quantize_q8_0(np.full((2, 32), np.nan, np.float32))
    with pytest.raises(ValueError, match="quantize='q5' is not one of"):
        qz.plan("0.q", 256, "q5")


@pytest.mark.parametrize("fmt,big", [("Q8_0", 1e7), ("Q4_K", -1e7), ("Q4_K", 1e9)])
def test_weights_past_float16_scales_raise(fmt, big):
    """A block whose scale (Q8_0: max|x| / 127) or super-scale (Q4_K) has no finite float16 value is an error
    naming the largest weight, not planes that dequantize to inf or NaN."""
    w = np.ones((2, 256), np.float32)
    w[1, 7] = big
    with pytest.raises(ValueError, match=f"{fmt} .*float16.*{re.escape(f'{abs(big):g}')}"):
        qz.quantize(w, fmt)
    assert np.isfinite(dequantize_f64(qz.quantize(w / abs(big) * 1e5, fmt), fmt)).all()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random Llama (hidden 256, so Q4_K fits every projection; std 0.05 weights) saved by transformers."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("random_llama")
    model.save_pretrained(directory)
    return directory


@functools.cache
def forward(config):
    return jax.jit(functools.partial(llama.forward, config=config))


# Logits' relative error against the float model: measured 0.021 (Q8_0) and 0.26 (Q4_K), asserted at about twice.
LOGIT_TOL = {"q8_0": 0.05, "q4_k": 0.5}
# Greedy choices equal to the float model's (teacher-forced): measured 0.94 and 0.65 on this random model, whose
# top logits lie close together; a 4-bit model of real weights keeps far more (SmolLM2's file is Q4_1).
AGREEMENT = {"q8_0": 0.85, "q4_k": 0.5}


@pytest.mark.parametrize("choice", ["q8_0", "q4_k"])
def test_safetensors_quantized_round_trip(saved, rng, choice):
    dense = load_safetensors(saved, "f32", progress=False, layout="layers")
    model = load_safetensors(saved, "f32", progress=False, layout="layers", quantize=choice)
    layer = model.params.layers[0]
    assert layer.wqkv.format == layer.w_down.format == choice.upper()
    assert model.params.embed.format == model.params.lm_head.format == "Q8_0"
    assert model.info["quantize"] == choice
    c = model.config
    tokens = jnp.asarray(rng.integers(0, c.vocab_size, (2, 24)), jnp.int32)
    cache = jkv.KVCache.init(jkv.CacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, 32), 2)
    got, _ = forward(c)(model.params, cache, tokens)
    want, _ = forward(c)(dense.params, cache, tokens)
    assert rel_err(got, want) < LOGIT_TOL[choice]
    agree = float(np.mean(np.argmax(got, -1) == np.argmax(want, -1)))
    assert agree >= AGREEMENT[choice], agree
    exact, _ = forward(c)(quant.dequantize_params(model.params), cache, tokens)
    assert rel_err(got, exact) < 1e-5


def test_load_names_the_tensor_it_cannot_quantize(saved, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(saved / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = 1e9
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_bytes((saved / "config.json").read_bytes())
    with pytest.raises(ModelLoadError, match=r"cannot quantize 'model\.layers\.1\.mlp\.down_proj\.weight' .*1e\+09"):
        load_safetensors(tmp_path, "f32", progress=False, quantize="q8_0")
