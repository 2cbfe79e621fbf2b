"""GGUF files of the new architectures, written here as llama.cpp's converter names them from an HF model's
weights (Qwen3: ``attn_q_norm`` / ``attn_k_norm``, unpermuted rows; Phi-3: fused ``attn_qkv`` and an ``ffn_up`` of
gate then up rows, ``attention.sliding_window``): jkv's logits against HF's."""

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
NAMES |= {"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}


def write_gguf(path, model, arch: str) -> None:
    c = model.config
    writer = gguf.GGUFWriter(str(path), arch=arch)
    meta = {"block_count": c.num_hidden_layers, "context_length": 128, "embedding_length": c.hidden_size}
    meta |= {"feed_forward_length": c.intermediate_size, "attention.head_count": c.num_attention_heads}
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    meta |= {"attention.head_count_kv": c.num_key_value_heads, "attention.key_length": d}
    meta |= {"attention.value_length": d, "vocab_size": c.vocab_size}
    for key, value in meta.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.rope.freq_base", c.rope_parameters["rope_theta"])
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    if getattr(c, "sliding_window", None):
        writer.add_uint32(f"{arch}.attention.sliding_window", c.sliding_window)
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


CONFIGS = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, hidden_size=64, num_attention_heads=4)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(hidden_size=192, num_attention_heads=2, sliding_window=8)),
}


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_gguf_matches_hf(arch, tmp_path, rng):
    config_cls, model_cls, extra = CONFIGS[arch]
    config = getattr(transformers, config_cls)(
        vocab_size=96, intermediate_size=80, num_hidden_layers=2, num_key_value_heads=1, tie_word_embeddings=False,
        attn_implementation="eager", bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" in name else 0.15) + (1.0 if "norm" in name else 0.0))
    write_gguf(tmp_path / f"{arch}.gguf", model, arch)
    loaded = load_gguf(tmp_path / f"{arch}.gguf", "f32", progress=False, with_tokenizer=False)
    c = loaded.config
    assert c.qk_norm == (arch == "qwen3") and c.architecture == arch
    assert c.windows == ((8,) * 2 if arch == "phi3" else None)
    tokens = rng.integers(0, 96, (2, 14))  # past Phi-3's window
    with torch.no_grad():
        want = model(torch.tensor(tokens)).logits.numpy()
    cache = jkv.make_cache("f32", jkv.CacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, 16), 2)
    forward = jax.jit(functools.partial(llama.forward, config=c, options=llama.LlamaOptions(impl="xla")))
    logits, _ = forward(loaded.params, cache, jnp.asarray(tokens, jnp.int32))
    assert rel_err(logits, want) < 1e-5
