"""GGUF files of each family, written from a small random HF model as llama.cpp's converter writes them
(tests/helpers_families.py: Mistral as ``llama`` with permuted Q/K rows, Qwen3's q/k norms, Phi-3's fused tensors,
Gemma's ``1 + w`` norms and metadata), loaded by jkv: logits at every position of two prompts and HF's 16 greedy
continuation tokens (one forward pass, past the window) against HF's, and their argmax against those tokens.
What the metadata alone decides (layer patterns, Gemma's query scale, defaults, refusals) is checked on dicts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from helpers_compile import FAST_COMPILE
from helpers_families import GGUF_CASES, PROMPTS, WINDOW, hf_greedy, hf_model, write_gguf

import jkv
from jkv.loading import ModelLoadError, load_gguf
from jkv.loading.gguf import config_from_metadata
from jkv.models import llama

STEPS = 16  # teacher-forced in one forward pass: decode steps are tests/models/test_families.py's
WANT = {
    "mistral": dict(windows=(WINDOW,) * 2),
    "qwen3": dict(qk_norm=True, windows=None),
    "phi3": dict(windows=(WINDOW,) * 2),
    "gemma2": dict(windows=(WINDOW, None, WINDOW), attn_softcap=2.0, final_softcap=4.0, query_scale=0.25),
    "gemma3": dict(windows=(WINDOW,) * 5 + (None,), qk_norm=True, rope_local_theta=1e4, rope_linear_factor=2.0),
}


@pytest.mark.parametrize("family", list(GGUF_CASES))
def test_gguf_matches_hf(family, tmp_path):
    arch, overrides = GGUF_CASES[family]
    model = hf_model(family, **overrides)
    write_gguf(tmp_path / f"{family}.gguf", model, arch)
    loaded = load_gguf(tmp_path / f"{family}.gguf", "f32", progress=False, with_tokenizer=False)
    c = loaded.config
    assert c.architecture == arch and c.sandwich_norms == family.startswith("gemma")
    for field, value in WANT[family].items():
        assert getattr(c, field) == value, field
    rng = np.random.default_rng(len(family))
    prompts = [rng.integers(3, c.vocab_size, n).tolist() for n in PROMPTS[:2]]  # 5 and 11 tokens
    refs = hf_greedy(model, prompts, STEPS)
    seqs = [p + t[:-1] for p, (t, _) in zip(prompts, refs, strict=True)]  # what HF's logits were computed on
    tokens = np.full((len(seqs), max(map(len, seqs))), 5, np.int32)
    for i, seq in enumerate(seqs):
        tokens[i, : len(seq)] = seq
    cache = jkv.make_cache("f32", jkv.CacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, 32), len(seqs))
    forward = functools.partial(llama.forward, config=c, options=llama.LlamaOptions(impl="xla"))
    logits, _ = jax.jit(forward, compiler_options=FAST_COMPILE)(loaded.params, cache, jnp.asarray(tokens))
    for row, seq, (greedy, ref) in zip(np.asarray(logits), seqs, refs, strict=True):
        assert rel_err(row[: len(seq)], ref) < 1e-5
        assert (row[len(seq) - STEPS : len(seq)].argmax(-1) == greedy).all()


def gemma_meta(arch: str, layers: int, **keys) -> dict:
    meta = {"general.architecture": arch, f"{arch}.vocab_size": 96, f"{arch}.block_count": layers}
    meta |= {f"{arch}.{k}": v for k, v in dict(embedding_length=4608, feed_forward_length=64).items()}
    meta |= {f"{arch}.attention.{k}": v for k, v in dict(head_count=32, head_count_kv=16, key_length=128).items()}
    meta[f"{arch}.attention.layer_norm_rms_epsilon"] = 1e-6
    return meta | {f"{arch}.{k}": v for k, v in keys.items()}


def test_metadata_rules():
    """llama.cpp's reading of what the file leaves out: Gemma 2's window and soft caps, the 27B query scale
    (hidden // heads, told by the layer count), Gemma 3 without a window; an explicit layer pattern."""
    names = {"blk.0.attn_q.weight"}
    gemma2, _ = config_from_metadata(gemma_meta("gemma2", 4), names, "f")
    assert gemma2.windows == (4096, None, 4096, None) and (gemma2.attn_softcap, gemma2.final_softcap) == (50, 30)
    assert gemma2.query_scale == 128**-0.5 and gemma2.embed_scale == 4608**0.5 and gemma2.tie_embeddings
    assert gemma2.rope_theta == 10000.0 and gemma2.activation == "gelu_tanh"
    large, _ = config_from_metadata(gemma_meta("gemma2", 46), names, "f")
    assert large.query_scale == 144**-0.5
    large3, _ = config_from_metadata(gemma_meta("gemma3", 62, **{"attention.sliding_window": 16}), names, "f")
    assert large3.query_scale == 144**-0.5 and large3.windows[:6] == (16,) * 5 + (None,)
    assert large3.rope_local_theta == 10000.0 and large3.final_softcap is None and large3.attn_softcap is None
    plain3, _ = config_from_metadata(gemma_meta("gemma3", 6), names, "f")
    assert plain3.windows is None and plain3.rope_local_theta is None and plain3.uniform_layers
    flags = [True, False, False, True]
    meta = gemma_meta("gemma3", 4, **{"attention.sliding_window": 16, "attention.sliding_window_pattern": flags})
    assert config_from_metadata(meta, names, "f")[0].windows == (16, None, None, 16)
    meta = gemma_meta("llama", 3, **{"attention.sliding_window": 16, "attention.sliding_window_pattern": 3})
    assert config_from_metadata(meta, names, "f")[0].windows == (16, 16, None)
    assert config_from_metadata(gemma_meta("llama", 3), names, "f")[0].windows is None


@pytest.mark.parametrize(
    "arch,keys,match",
    [
        ("gemma", {}, r"unsupported architecture 'gemma' in f: jkv supports \('llama', .*'gemma2', 'gemma3'\)"),
        ("falcon", {}, "unsupported architecture 'falcon'"),
        ("gemma3", {"attention.sliding_window": -1}, r"gemma3.attention.sliding_window=-1 is invalid"),
        ("gemma3", {"attention.sliding_window": 8, "attention.sliding_window_pattern": [True]}, "4 booleans"),
        ("gemma2", {"final_logit_softcapping": float("nan")}, "gemma2.final_logit_softcapping=nan is invalid"),
        ("llama", {"rope.dimension_count": 64}, r"llama.rope.dimension_count=64 is invalid: expected an integer in"),
    ],
)
def test_metadata_refusals(arch, keys, match):
    with pytest.raises(ModelLoadError, match=match):
        config_from_metadata(gemma_meta(arch, 4, **keys), {"blk.0.attn_q.weight"}, "f")
