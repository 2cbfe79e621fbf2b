"""Each model family against HF transformers (eager attention, float32, CPU) on random weights of a small config
saved by transformers and loaded by jkv: logits after a ragged prefill and over 32 teacher-forced decode steps,
greedy tokens, on 4 prompts whose length plus generation passes the window, contiguous and paged caches."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from helpers_compile import FAST_COMPILE
from helpers_families import (
    FAMILIES,
    STEPS,
    WINDOW,
    flat_columns,
    flat_forced,
    forced_logits,
    loaded_family,
    padded_prompts,
    teacher_forced,
)

import jkv
from jkv.models import llama

XLA = llama.LlamaOptions(impl="xla")


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(family, loaded jkv model, each prompt's HF greedy tokens, HF logits at every position)."""
    return loaded_family(request.param, tmp_path_factory)


def test_config_options(family):
    name, loaded, _, _ = family
    c = loaded.config
    assert c.qk_norm == (name in ("qwen3", "gemma3"))
    assert c.sandwich_norms == name.startswith("gemma") and (c.embed_scale is not None) == name.startswith("gemma")
    windows = {"qwen3": None, "gemma2": (WINDOW, None, WINDOW), "gemma3": (WINDOW, WINDOW, None)}
    assert c.windows == windows.get(name, (WINDOW,) * c.num_layers)
    assert (c.attn_softcap, c.final_softcap) == ((2.0, 4.0) if name == "gemma2" else (None, None))
    assert (c.rope_local_theta is not None) == (name == "gemma3")


@pytest.mark.parametrize("kind", ["f32", "paged"])
def test_matches_hf(family, kind):
    """A ragged prefill, then 31 decode steps fed HF's greedy tokens (one compiled scan): logits and argmax against
    HF's after the prefill and after every step. Contiguous: through ``llama.prefill`` and ``llama.decode_step``;
    paged (pages of 8): in the serving step's form, flat steps of 32 rows (all prompts as one step, then one token
    per sequence; rows past the real tokens are padding), the prefill and every step one compiled program."""
    _, loaded, prompts, refs = family
    c = loaded.config
    padded, lengths = padded_prompts(prompts)
    spec = jkv.CacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, 64)
    cache = jkv.make_cache(kind, spec, len(prompts), **({"page_size": 8} if kind == "paged" else {}))
    tokens = np.array([t for t, _ in refs])  # (B, STEPS)
    model = dict(config=c, options=XLA)
    if kind == "paged":
        logits, cache = flat_forced(loaded.params, cache, *flat_columns(prompts, tokens[:, :-1]), **model)
        logits, steps = forced_logits(logits)
    else:
        logits, steps, cache = teacher_forced(loaded.params, cache, padded, lengths, tokens[:, :-1], **model)
        logits, steps = np.asarray(logits), np.asarray(steps)
    want = np.stack([ref[n - 1] for n, (_, ref) in zip(lengths, refs, strict=True)])
    assert rel_err(logits, want) < 1e-5
    assert (logits.argmax(-1) == tokens[:, 0]).all()
    for j in range(STEPS - 1):
        want = np.stack([ref[n + j] for n, (_, ref) in zip(lengths, refs, strict=True)])
        assert rel_err(steps[:, j], want) < 1e-5, j
        assert (steps[:, j].argmax(-1) == tokens[:, j + 1]).all(), j
    np.testing.assert_array_equal(cache.lengths, lengths + STEPS - 1)


@functools.partial(jax.jit, static_argnames=("config", "options"), compiler_options=FAST_COMPILE)
def flat_logits(params, cache, tokens, counts, rows, *, config, options):
    """A flat step of ``tokens [32]`` and the logits of its ``rows``: one compile serves prefill and decode."""
    h, cache = llama.flat_hidden_states(params, cache, tokens, counts, config=config, options=options)
    return llama.lm_head(params, h[rows], options, config=config), cache


def test_flat_steps_on_the_pallas_kernel(family):
    """The serving step's form on the Pallas multi-token kernel (interpret mode) for Gemma 2 only (window, soft
    cap, query scale): all prompts as one flat step of 32 rows (those past the real tokens padding), then 4 flat
    decode steps of one token per sequence fed HF's greedy tokens (past the window), on a paged cache
    (test_matches_hf runs the XLA path on every family)."""
    name, loaded, prompts, refs = family
    if name != "gemma2":
        pytest.skip("one family with windows runs the kernel in interpret mode")
    c, options = loaded.config, llama.LlamaOptions(impl="pallas")
    spec = jkv.CacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, 64)
    cache = jkv.make_cache("paged", spec, len(prompts), page_size=8)
    step = functools.partial(flat_logits, loaded.params, config=c, options=options)
    lengths = np.array([len(p) for p in prompts])
    tokens = np.full(32, 7, np.int32)  # rows past the prompts are padding
    tokens[: lengths.sum()] = np.concatenate(prompts)
    logits, cache = step(cache, tokens, jnp.asarray(lengths, jnp.int32), np.cumsum(lengths) - 1)
    want = np.stack([ref[n - 1] for n, (_, ref) in zip(lengths, refs, strict=True)])
    assert rel_err(logits, want) < 1e-5
    ones, first, padding = jnp.ones(len(prompts), jnp.int32), np.arange(len(prompts)), [7] * (32 - len(prompts))
    for j in range(4):
        tokens = np.array([t[j] for t, _ in refs] + padding, np.int32)
        logits, cache = step(cache, tokens, ones, first)
        want = np.stack([ref[n + j] for n, (_, ref) in zip(lengths, refs, strict=True)])
        assert rel_err(logits, want) < 1e-5, j
    np.testing.assert_array_equal(cache.lengths, lengths + j + 1)


def test_transformers4_spellings_and_refusals():
    """Gemma 3's and Gemma 2's older config.json (no layer_types, rope_local_base_freq) map to the same windows
    and rope bases; what the decoder cannot run is refused with the field named."""
    from jkv.loading import ModelLoadError
    from jkv.loading.safetensors import config_from_hf

    base = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=7, num_attention_heads=4)
    base |= dict(num_key_value_heads=2, head_dim=16, sliding_window=8, query_pre_attn_scalar=16)
    gemma3, _ = config_from_hf(base | dict(model_type="gemma3_text", rope_theta=1e6, rope_local_base_freq=1e4))
    assert gemma3.windows == (8, 8, 8, 8, 8, None, 8) and gemma3.rope_local_theta == 1e4
    assert gemma3.rope_theta == 1e6 and not gemma3.uniform_layers and gemma3.qk_norm
    gemma2, _ = config_from_hf(base | dict(model_type="gemma2", attn_logit_softcapping=50.0))
    assert gemma2.windows == (8, None, 8, None, 8, None, 8) and gemma2.attn_softcap == 50.0
    assert gemma2.activation == "gelu_tanh" and gemma2.query_scale == 0.25 and gemma2.embed_scale == 8.0
    with pytest.raises(ModelLoadError, match="use_sliding_window"):
        config_from_hf(base | dict(model_type="qwen3", use_sliding_window=True))
    with pytest.raises(ModelLoadError, match="partial_rotary_factor"):
        config_from_hf(base | dict(model_type="phi3", partial_rotary_factor=0.75))
    with pytest.raises(ModelLoadError, match="hidden_act"):
        config_from_hf(base | dict(model_type="mistral", hidden_act="relu"))


def test_layer_layouts_and_init(family, rng):
    """Per-layer buffers give the stacked layout's logits; random init passes the shape checks of the family (its
    shapes: traced, not run)."""
    name, loaded, _, _ = family
    if name != "gemma3":
        pytest.skip("Gemma 3 has every per-layer option")
    c = loaded.config
    llama.check_params(jax.eval_shape(lambda: llama.init_params(c, jax.random.key(0), layout="stacked")), c)
    tokens = jnp.asarray(rng.integers(0, c.vocab_size, (2, 10)), jnp.int32)
    spec = jkv.CacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, 16)
    forward = functools.partial(llama.forward, config=c, options=llama.LlamaOptions(impl="xla"))
    both = jax.jit(
        lambda stacked, layers, cache, t: (forward(stacked, cache, t)[0], forward(layers, cache, t)[0]),
        compiler_options=FAST_COMPILE,
    )
    params = [llama.with_layout(loaded.params, layout) for layout in ("stacked", "layers")]
    stacked, layers = both(*params, jkv.make_cache("f32", spec, 2), tokens)  # one compile for both layouts
    assert rel_err(layers, stacked) < 1e-6


def test_padded_decode_at_head_dim_96_on_the_pallas_path(family):
    """Phi-3's head_dim 96 is not a power of two: on the Pallas path (interpret mode) its padded T = 1 steps run
    the decode kernel, which reads it in power-of-two column chunks (64 + 32); prefill and 8 decode steps fed
    HF's greedy tokens against HF's logits."""
    name, loaded, prompts, refs = family
    if name != "phi3":
        pytest.skip("the family whose head_dim is not a power of two")
    c, options = loaded.config, llama.LlamaOptions(impl="pallas")
    assert c.head_dim == 96
    padded, lengths = padded_prompts(prompts)
    cache = jkv.make_cache("f32", jkv.CacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, 64), len(prompts))
    jaxpr = jax.make_jaxpr(lambda cache, t: llama.decode_step(loaded.params, cache, t, config=c, options=options))
    names = set(re.findall(r"name=(jkv_\w+)", str(jaxpr(cache, padded[:, 0]))))
    assert any("decode" in n for n in names) and not any("multi_token" in n for n in names), names
    tokens = np.array([t for t, _ in refs])[:, :9]
    logits, steps, _ = teacher_forced(loaded.params, cache, padded, lengths, tokens[:, :-1], config=c, options=options)
    want = np.stack([ref[n - 1] for n, (_, ref) in zip(lengths, refs, strict=True)])
    assert rel_err(np.asarray(logits), want) < 1e-5
    for j in range(tokens.shape[1] - 1):
        want = np.stack([ref[n + j] for n, (_, ref) in zip(lengths, refs, strict=True)])
        assert rel_err(np.asarray(steps)[:, j], want) < 1e-5, j
        assert (np.asarray(steps)[:, j].argmax(-1) == tokens[:, j + 1]).all(), j
