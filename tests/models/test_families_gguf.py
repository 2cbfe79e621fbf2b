"""GGUF files of the new architectures, written here as llama.cpp's converter names them from an HF model's
weights (Qwen3: ``attn_q_norm`` / ``attn_k_norm``, unpermuted rows): jkv's logits against HF's."""

import functools

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

import jkv
from jkv.loading import load_gguf
from jkv.models import llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.o_proj": "attn_output"}
NAMES |= {f"self_attn.{x}_proj": f"attn_{x}" for x in "qkv"} | {f"self_attn.{x}_norm": f"attn_{x}_norm" for x in "qk"}
NAMES |= {f"mlp.{x}_proj": f"ffn_{x}" for x in ("gate", "up", "down")}


def write_gguf(path, model, arch: str) -> None:
    c = model.config
    writer = gguf.GGUFWriter(str(path), arch=arch)
    meta = {"block_count": c.num_hidden_layers, "context_length": 128, "embedding_length": c.hidden_size}
    meta |= {"feed_forward_length": c.intermediate_size, "attention.head_count": c.num_attention_heads}
    meta |= {"attention.head_count_kv": c.num_key_value_heads, "attention.key_length": c.head_dim}
    meta |= {"attention.value_length": c.head_dim, "vocab_size": c.vocab_size}
    for key, value in meta.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.rope.freq_base", c.rope_parameters["rope_theta"])
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    for name, w in model.state_dict().items():
        w = w.numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            writer.add_tensor("token_embd.weight", w)
        elif name == "model.norm.weight":
            writer.add_tensor("output_norm.weight", w)
        elif name == "lm_head.weight":
            writer.add_tensor("output.weight", w)
        else:
            _, _, layer, rest = name.removesuffix(".weight").split(".", 3)
            writer.add_tensor(f"blk.{layer}.{NAMES[rest]}.weight", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_qwen3_gguf_matches_hf(tmp_path, rng):
    config = transformers.Qwen3Config(
        vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" in name else 0.15) + (1.0 if "norm" in name else 0.0))
    write_gguf(tmp_path / "qwen3.gguf", model, "qwen3")
    loaded = load_gguf(tmp_path / "qwen3.gguf", "f32", progress=False, with_tokenizer=False)
    assert loaded.config.qk_norm and loaded.config.architecture == "qwen3"
    tokens = rng.integers(0, 96, (2, 12))
    with torch.no_grad():
        want = model(torch.tensor(tokens)).logits.numpy()
    c = loaded.config
    cache = jkv.make_cache("f32", jkv.CacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, 16), 2)
    forward = jax.jit(functools.partial(llama.forward, config=c, options=llama.LlamaOptions(impl="xla")))
    logits, _ = forward(loaded.params, cache, jnp.asarray(tokens, jnp.int32))
    assert rel_err(logits, want) < 1e-5
