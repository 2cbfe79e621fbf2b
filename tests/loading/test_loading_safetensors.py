"""HF safetensors directories against HF transformers on the same weights: a tiny random Qwen2 with q/k/v biases
and a tiny Llama with Llama 3.1 rope scaling (prefill and decode logits, 32 greedy tokens on 5 prompts), sharded
files, dtypes, tokenizer.json with a chat template, and every load error."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from helpers_loading import HF_CASES, hf_greedy, random_hf_model

import jkv
from jkv.loading import ModelLoadError, load, load_safetensors
from jkv.models import llama
from jkv.serving import Generator

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=list(HF_CASES))
def saved(request, tmp_path_factory):
    """(case, HF model, directory with config.json + model.safetensors)."""
    model = random_hf_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    return request.param, model, directory


def test_safetensors_matches_hf(saved, rng):
    """Prefill of 5 ragged prompts, 8 teacher-forced decode steps and 32 greedy tokens, all against HF."""
    case, model, directory = saved
    loaded = load(directory, "f32", progress=False)
    c = loaded.config
    assert c.qkv_bias == case.startswith("qwen2") and c.tie_embeddings == model.config.tie_word_embeddings
    assert c.architecture == model.config.model_type
    prompts = [rng.integers(0, c.vocab_size, n).tolist() for n in (5, 9, 2, 14, 7)]
    hf = hf_greedy(model, prompts)

    lengths = np.array([len(p) for p in prompts], np.int32)
    padded = np.zeros((5, lengths.max()), np.int32)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = p
    spec = jkv.CacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, 64)
    prefill = jax.jit(functools.partial(llama.prefill, config=c))
    logits, cache = prefill(loaded.params, jkv.KVCache.init(spec, 5), jnp.asarray(padded), lengths - 1)
    cache = cache.rollback(jnp.asarray(lengths))
    assert rel_err(logits, np.stack([ref[n - 1] for n, (_, ref) in zip(lengths, hf, strict=True)])) < 1e-4
    step = jax.jit(functools.partial(llama.decode_step, config=c), donate_argnums=1)
    for j in range(8):
        logits, cache = step(loaded.params, cache, jnp.asarray([t[j] for t, _ in hf], jnp.int32))
        assert rel_err(logits, np.stack([ref[n + j] for n, (_, ref) in zip(lengths, hf, strict=True)])) < 1e-4, j

    generator = Generator(c, loaded.params, max_len=64, batch=5, buckets=(64,))  # one step shape: one compile
    result = generator.generate(prompts, max_new_tokens=32)
    assert result.tokens == [t for t, _ in hf]


def test_sharded_files_and_bf16(saved, tmp_path):
    _, model, _ = saved
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ref = load_safetensors(tmp_path, "f32", progress=False, layout="layers")
    half = load_safetensors(tmp_path, "bf16", progress=False, layout="layers")
    assert half.params.dtype == jnp.bfloat16 and ref.params.dtype == jnp.float32
    assert half.info == {
        "format": "safetensors",
        "files": len(list(tmp_path.glob("*.safetensors"))),
        "dtype": "bfloat16",
        "quantize": None,
    }
    w = model.model.layers[1].self_attn.k_proj.weight.detach().numpy()
    np.testing.assert_array_equal(llama.unfuse_qkv(np.asarray(ref.params.layers[1].wqkv))[1], w.T)
    assert rel_err(half.params.layers[1].wqkv.astype(jnp.float32), ref.params.layers[1].wqkv) < 4e-3


def test_tokenizer_json_and_chat_template(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    random_hf_model("qwen2-bias-gqa2-tied").save_pretrained(tmp_path)
    vocab = {"<s>": 0, "</s>": 1, "<|im_end|>": 2, "hello": 3, "world": 4, "[UNK]": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>", "<|im_end|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    template = "{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }}</s>{% endfor %}"
    config = {"bos_token": {"content": "<s>"}, "eos_token": "</s>", "add_bos_token": True, "chat_template": template}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    t = load(tmp_path, "f32", progress=False).tokenizer
    assert (t.bos_id, t.eos_id, t.stop_ids) == (0, 1, (1, 2))
    assert t.encode("hello world") == [0, 3, 4]
    assert t.render_chat([{"role": "user", "content": "hello"}]) == "<s>user hello</s>"
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert load(tmp_path, "f32", progress=False).tokenizer.render_chat([{"role": "user", "content": "hi"}]) == "hi!"


# ---------------------------------------------------------------------------------------------- errors
def edit_config(**changes):
    def edit(directory):
        config = json.loads((directory / "config.json").read_text())
        for key, value in changes.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        (directory / "config.json").write_text(json.dumps(config))

    return edit


def drop_tensor(name):
    def edit(directory):
        from safetensors.numpy import load_file, save_file

        tensors = load_file(directory / "model.safetensors")
        del tensors[name]
        save_file(tensors, directory / "model.safetensors")

    return edit


ERRORS = {
    "missing-directory": (None, "model not found: '.*/absent'"),
    "no-config": (lambda d: (d / "config.json").unlink(), "has no config.json"),
    "config-not-json": (lambda d: (d / "config.json").write_text("{oops"), "config.json' is not valid JSON"),
    "unsupported-architecture": (edit_config(model_type="gpt2"), "unsupported architecture model_type='gpt2'"),
    "unsupported-activation": (edit_config(hidden_act="gelu"), "unsupported hidden_act='gelu'"),
    "unsupported-rope": (
        edit_config(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
        "unsupported rope_parameters.rope_type='yarn'",
    ),
    "sliding-window": (edit_config(use_sliding_window=True), "unsupported use_sliding_window=True"),
    "mlp-bias": (edit_config(mlp_bias=True), "unsupported mlp_bias=True"),
    "missing-field": (edit_config(hidden_size=None), "lacks the field 'hidden_size'"),
    "no-weights": (lambda d: (d / "model.safetensors").unlink(), "has no \\*.safetensors files"),
    "corrupt-weights": (
        lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"),
        "cannot read safetensors file",
    ),
    "missing-tensor": (
        drop_tensor("model.layers.1.mlp.up_proj.weight"),
        "tensor 'model.layers.1.mlp.up_proj.weight' is missing",
    ),
    "untied-without-lm-head": (
        edit_config(tie_word_embeddings=False),
        "tie_word_embeddings is false but tensor 'lm_head.weight' is missing",
    ),
    "wrong-shape": (
        edit_config(intermediate_size=100),
        r"tensor 'model.layers.0.mlp.gate_proj.weight' in .* has shape \(96, 64\), expected \(100, 64\) "
        r"\(100 from intermediate_size=100, 64 from hidden_size=64\)",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_load_errors_name_the_problem(case, tmp_path):
    make, message = ERRORS[case]
    directory = tmp_path / "absent"
    if make is not None:
        directory.mkdir()
        random_hf_model("qwen2-bias-gqa2-tied").save_pretrained(directory)
        make(directory)
    with pytest.raises(ModelLoadError, match=message):
        load(directory, "f32", progress=False)


def test_direct_loader_on_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match=r"safetensors model directory not found: '.*/nowhere'"):
        load_safetensors(tmp_path / "nowhere")


def test_shards_are_the_index_files(tmp_path):
    """HF's choice of files: ``model.safetensors`` when there is one (shards beside it are stale), else the files
    ``model.safetensors.index.json`` names, each of which must be there."""
    model = random_hf_model("qwen2-bias-mha-untied")
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    ref = load_safetensors(tmp_path, "f32", progress=False, layout="layers")
    assert ref.info["files"] == len(shards) > 2
    model.save_pretrained(tmp_path / "single")
    (tmp_path / "single" / "model.safetensors").rename(tmp_path / "model.safetensors")
    single = load_safetensors(tmp_path, "f32", progress=False, layout="layers")
    assert single.info["files"] == 1
    assert jax.tree.all(jax.tree.map(np.array_equal, single.params, ref.params))
    (tmp_path / "model.safetensors").unlink()
    shards[-1].unlink()
    with pytest.raises(ModelLoadError, match=rf"index\.json' names {shards[-1].name!r}, which is not in"):
        load_safetensors(tmp_path, "f32", progress=False)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": [1]}')
    with pytest.raises(ModelLoadError, match=r"index\.json' .*expected .*weight_map"):
        load_safetensors(tmp_path, "f32", progress=False)


def test_tokenizer_errors_come_before_the_weights_load(tmp_path, monkeypatch):
    import jkv.loading.safetensors

    random_hf_model("qwen2-bias-gqa2-tied").save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{oops")
    monkeypatch.setattr(jkv.loading.safetensors, "build_params", lambda *a, **k: pytest.fail("the weights loaded"))
    with pytest.raises(jkv.loading.TokenizerError, match=r"cannot read '.*tokenizer\.json'"):
        load_safetensors(tmp_path, "f32", progress=False)


def test_added_tokens_past_the_embedding_table(tmp_path):
    """Gemma 3 1B's tokenizer.json adds <image_soft_token> at id 262144, one past its 262144 embeddings: the model
    loads (a prompt holding that token is refused where prompts are checked), but a tokenizer whose own vocabulary
    outgrows the table is refused."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    random_hf_model("qwen2-bias-gqa2-tied").save_pretrained(tmp_path)  # vocab_size 211
    vocab = {"<s>": 0, "</s>": 1} | {f"w{i}": i for i in range(2, 211)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<s>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<s>", "</s>", "<image_soft_token>"])  # the last one is id 211
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load(tmp_path, "f32", progress=False)
    assert loaded.tokenizer.vocab_size == 212 and loaded.tokenizer.encode("w5 w7") == [5, 7]
    generator = Generator(loaded.config, loaded.params, max_len=16, batch=1, buckets=(16,))
    with pytest.raises(ValueError, match=r"token ids outside \[0, vocab_size=211\)"):
        generator.generate([loaded.tokenizer.encode("w5 <image_soft_token>")], max_new_tokens=1)
    vocab["w211"] = 211
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<s>"))
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(jkv.loading.TokenizerError, match=r"the tokenizer has 212 tokens but vocab_size=211"):
        load(tmp_path, "f32", progress=False)
