"""GGUF inputs the other GGUF tests do not name: tensors jkv would not read (llama.cpp reads a Llama's
``attn_output.bias``; a Phi-3 128k file holds its long-rope factors), family keys llama.cpp ignores, and files
jkv cannot read at all (big-endian); tokenizer metadata as llama.cpp reads it."""

import gguf
import numpy as np
import pytest
from helpers_loading import TINY, byte_level_alphabet, write_tiny_gguf

from jkv.loading import ModelLoadError, load_gguf
from jkv.loading.gguf import config_from_metadata
from jkv.loading.tokenizer import TokenizerError, from_gguf_metadata

H = TINY["hidden"]
UNREAD = {
    "o-bias": {f"blk.{i}.attn_output.bias": np.ones(H) for i in range(2)},
    "mlp-bias": {"blk.0.ffn_down.bias": np.ones(H)},
    "qkv-bias-layer1-only": {"blk.1.attn_q.bias": np.ones(H)},
    "longrope-factors": {"rope_factors_long.weight": np.ones(32), "rope_factors_short.weight": np.ones(32)},
}


@pytest.mark.parametrize("case", list(UNREAD))
def test_tensors_jkv_would_not_read_are_refused(case, tmp_path, rng):
    """Dropping a tensor the file holds changes the model (llama.cpp itself refuses a tensor it does not create)."""
    write_tiny_gguf(tmp_path / "m.gguf", rng, extra=UNREAD[case])
    first = sorted(UNREAD[case])[0]
    with pytest.raises(ModelLoadError, match=rf"holds tensors jkv does not read .*'{first}'"):
        load_gguf(tmp_path / "m.gguf", "f32", progress=False, with_tokenizer=False)


def test_gemma3_ignores_an_attention_soft_cap_key():
    """llama.cpp's and HF's Gemma 3 attention apply no soft cap, whatever the file says; its final cap is read."""
    meta = {"general.architecture": "gemma3", "gemma3.vocab_size": 96, "gemma3.block_count": 6}
    meta |= {"gemma3.embedding_length": 64, "gemma3.feed_forward_length": 64, "gemma3.attention.head_count": 4}
    meta |= {"gemma3.attn_logit_softcapping": 50.0, "gemma3.final_logit_softcapping": 30.0}
    meta["gemma3.attention.layer_norm_rms_epsilon"] = 1e-6
    config, _ = config_from_metadata(meta, {"blk.0.attn_q.weight"}, "f")
    assert config.attn_softcap is None and config.final_softcap == 30.0


def test_a_big_endian_file_is_refused_as_such(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "be.gguf"), arch="llama", endianess=gguf.GGUFEndian.BIG)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match=r"be\.gguf' is a big-endian GGUF file \(version 3\): jkv reads"):
        load_gguf(tmp_path / "be.gguf", "f32", progress=False)


def byte_level_fields(**fields) -> dict:
    """GGUF ``tokenizer.*`` metadata of a byte-level BPE (no merges) with BOS at 256; ``None`` drops a key."""
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": [*byte_level_alphabet(), "<bos>", "<eos>"]}
    meta |= {"tokenizer.ggml.merges": [], "tokenizer.ggml.token_type": [1] * 256 + [3, 3]}
    meta |= {"tokenizer.ggml.bos_token_id": 256, "tokenizer.ggml.eos_token_id": 257}
    return {k: v for k, v in (meta | fields).items() if v is not None}


ADD_BOS = {  # (tokenizer.ggml.pre, tokenizer.ggml.add_bos_token) -> BOS prepended, as llama.cpp decides
    "llama-bpe-no-key": ("llama-bpe", None, True),
    "llama3-no-key": ("llama3", None, True),
    "llama-bpe-false": ("llama-bpe", False, False),
    "default-no-key": ("default", None, False),
    "qwen2-no-key": ("qwen2", None, False),
    "qwen2-true": ("qwen2", True, True),
}


@pytest.mark.parametrize("case", list(ADD_BOS))
def test_bpe_bos_default_follows_the_pre_tokenizer(case):
    """llama.cpp prepends BOS for Llama 3's pre-tokenizers unless the file says otherwise (older Llama 3 files
    carry no ``add_bos_token``), and for other byte-level BPEs only when the file asks for it."""
    pre, flag, want = ADD_BOS[case]
    tok = from_gguf_metadata(byte_level_fields(**{"tokenizer.ggml.pre": pre, "tokenizer.ggml.add_bos_token": flag}))
    assert tok.encode("hi") == ([256] if want else []) + [ord("h"), ord("i")]


ROPE = {  # <arch>.rope.* metadata -> the linear factor llama.cpp applies (its default scaling type is linear)
    "factor-without-type": ({"rope.scaling.factor": 4.0}, 4.0),
    "legacy-scale-linear": ({"rope.scale_linear": 2.0}, 2.0),
    "type-none-with-factor": ({"rope.scaling.type": "none", "rope.scaling.factor": 4.0}, 1.0),
    "nothing": ({}, 1.0),
}


@pytest.mark.parametrize("case", list(ROPE))
def test_rope_scaling_factor_as_llama_cpp_reads_it(case, tmp_path, rng):
    keys, factor = ROPE[case]
    write_tiny_gguf(tmp_path / "m.gguf", rng, strings=keys)
    config = load_gguf(tmp_path / "m.gguf", "f32", progress=False, with_tokenizer=False).config
    d = TINY["hidden"] // TINY["heads"]
    np.testing.assert_allclose(config.inv_freq(), 10000.0 ** (-np.arange(0, d, 2) / d) / factor, rtol=1e-6)


def test_rope_attention_factor_is_refused(tmp_path, rng):
    """llama.cpp multiplies every rotation by ``rope.scaling.attn_factor``; jkv cannot, and says so."""
    write_tiny_gguf(tmp_path / "m.gguf", rng, strings={"rope.scaling.attn_factor": 1.2})
    with pytest.raises(ModelLoadError, match=r"unsupported llama.rope.scaling.attn_factor=1.2\d* in .*: expected 1.0"):
        load_gguf(tmp_path / "m.gguf", "f32", progress=False, with_tokenizer=False)


SPM_FIELDS = {
    "tokenizer.ggml.model": "llama",
    "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "\u2581", "a", "\u2581a"],
    "tokenizer.ggml.scores": [0.0, 0.0, 0.0, -1.0, -1.0, -0.5],
    "tokenizer.ggml.token_type": [2, 3, 3, 1, 1, 1],
    "tokenizer.ggml.bos_token_id": 1,
    "tokenizer.ggml.eos_token_id": 2,
}
TYPE_ERRORS = {  # (tokenizer model, key, value, message): what the SentencePiece path let pass
    "spm-template-list": ("llama", "tokenizer.chat_template", [1, 2], "tokenizer.chat_template is a list, not text"),
    "spm-add-bos-text": ("llama", "tokenizer.ggml.add_bos_token", "false", "add_bos_token='false' is not a boolean"),
    "spm-space-prefix-text": ("llama", "tokenizer.ggml.add_space_prefix", "no", "add_space_prefix='no' is not a"),
    "bpe-add-bos-text": ("gpt2", "tokenizer.ggml.add_bos_token", "false", "add_bos_token='false' is not a boolean"),
    "bpe-add-eos-text": ("gpt2", "tokenizer.ggml.add_eos_token", "yes", "add_eos_token='yes' is not a boolean"),
    "spm-eot-float": ("llama", "tokenizer.ggml.eot_token_id", 2.0, r"eot_token_id=2.0 is not a token id"),
}


@pytest.mark.parametrize("case", list(TYPE_ERRORS))
def test_tokenizer_metadata_of_the_wrong_type_is_refused(case):
    model, key, value, message = TYPE_ERRORS[case]
    fields = (SPM_FIELDS if model == "llama" else byte_level_fields()) | {key: value}
    with pytest.raises(TokenizerError, match=message):
        from_gguf_metadata(fields)


def test_sentencepiece_flags_as_llama_cpp_reads_them():
    """BOS by default and an integer 0 or 1 read as a flag; EOT joins the stop ids."""
    tok = from_gguf_metadata(SPM_FIELDS | {"tokenizer.ggml.eot_token_id": 4})
    assert tok.encode("a") == [1, 5] and tok.stop_ids == (2, 4)
    tok = from_gguf_metadata(SPM_FIELDS | {"tokenizer.ggml.add_bos_token": 0, "tokenizer.ggml.add_space_prefix": 0})
    assert tok.encode("a") == [4] and tok.decode([5]) == " a"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_a_missing_norm_epsilon_is_refused_naming_the_key(arch):
    """llama.cpp requires the key; a default would be Llama's 1e-5 where Qwen2 and Gemma use 1e-6."""
    meta = {"general.architecture": arch, f"{arch}.vocab_size": 96, f"{arch}.block_count": 2}
    meta |= {f"{arch}.embedding_length": 64, f"{arch}.feed_forward_length": 64, f"{arch}.attention.head_count": 4}
    with pytest.raises(ModelLoadError, match=rf"lacks the metadata field {arch}.attention.layer_norm_rms_epsilon"):
        config_from_metadata(meta, {"blk.0.attn_q.weight"}, "f")


PRE = {  # tokenizer.ggml.pre -> (whether "34" of "1234" stays in one pre-token and merges, BOS by default)
    "default": (True, False),  # GPT-2's digit runs
    "qwen2": (False, False),  # one digit at a time
    "deepseek-r1-qwen": (False, False),  # llama.cpp reads it as qwen2
    "falcon3": (False, True),  # llama.cpp reads it as Llama 3's: digits in threes, BOS
    "smollm": (False, False),
}


@pytest.mark.parametrize("pre", list(PRE))
def test_pre_tokenizer_names_llama_cpp_reads_as_a_known_pattern(pre):
    merged, bos = PRE[pre]
    tokens = [*byte_level_alphabet(), "<bos>", "<eos>", "34"]
    fields = {"tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": ["3 4"]}
    tok = from_gguf_metadata(byte_level_fields(**fields, **{"tokenizer.ggml.token_type": [1] * 256 + [3, 3, 1]}))
    digits = [ord(c) for c in "1234"]
    assert tok.encode("1234") == [256] * bos + ([*digits[:2], 258] if merged else digits)


@pytest.mark.parametrize("pre", ["tekken", "deepseek-llm", ["gpt2"]], ids=["tekken", "deepseek-llm", "a-list"])
def test_an_unknown_pre_tokenizer_is_refused_naming_the_known_ones(pre):
    """Splitting as GPT-2 a text that the model splits otherwise gives other token ids, silently: llama.cpp
    refuses a name it does not know, and so does jkv."""
    with pytest.raises(TokenizerError, match=r"unsupported pre-tokenizer tokenizer.ggml.pre=.* as .*llama-bpe.*smollm"):
        from_gguf_metadata(byte_level_fields(**{"tokenizer.ggml.pre": pre}))


@pytest.mark.parametrize("pre", [None, ""], ids=["no-key", "empty"])
def test_a_missing_pre_tokenizer_is_gpt2s_and_sentencepiece_has_none(pre):
    """llama.cpp reads a byte-level BPE without a name as GPT-2's, and ignores the name for SentencePiece."""
    tok = from_gguf_metadata(byte_level_fields(**{"tokenizer.ggml.pre": pre}))
    assert tok.encode("hi 12") == [ord(c) for c in "hi 12"]
    assert from_gguf_metadata(SPM_FIELDS | {"tokenizer.ggml.pre": "tekken"}).encode("a") == [1, 5]


ADD_EOS = {  # (fields, text, add_eos argument) -> ids, as llama.cpp encodes with special tokens
    "bpe-flag": (byte_level_fields(**{"tokenizer.ggml.add_eos_token": True}), "hi", None, [104, 105, 257]),
    "bpe-flag-prompt": (byte_level_fields(**{"tokenizer.ggml.add_eos_token": True}), "hi", False, [104, 105]),
    "bpe-no-key": (byte_level_fields(), "hi", None, [104, 105]),
    "bpe-asked": (byte_level_fields(), "hi", True, [104, 105, 257]),
    "bpe-ends-with-eos": (
        byte_level_fields(**{"tokenizer.ggml.add_eos_token": True}),
        "hi<eos>",
        None,
        [104, 105, 257],
    ),
    "spm-flag": (SPM_FIELDS | {"tokenizer.ggml.add_eos_token": True}, "a", None, [1, 5, 2]),
    "spm-flag-int": (SPM_FIELDS | {"tokenizer.ggml.add_eos_token": 1}, "a", None, [1, 5, 2]),
    "spm-false": (SPM_FIELDS | {"tokenizer.ggml.add_eos_token": False}, "a", None, [1, 5]),
}


@pytest.mark.parametrize("case", list(ADD_EOS))
def test_add_eos_token_appends_eos_unless_the_caller_says_not(case):
    fields, text, add_eos, want = ADD_EOS[case]
    assert from_gguf_metadata(fields).encode(text, add_eos=add_eos) == want


@pytest.mark.parametrize("flag", [True, False, None], ids=["true", "false", "no-key"])
def test_add_eos_token_as_transformers_reads_the_file(tmp_path, flag):
    transformers = pytest.importorskip("transformers")
    w = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), arch="llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(SPM_FIELDS["tokenizer.ggml.tokens"])
    w.add_token_scores(SPM_FIELDS["tokenizer.ggml.scores"])
    w.add_token_types(SPM_FIELDS["tokenizer.ggml.token_type"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if flag is not None:
        w.add_add_eos_token(flag)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    want = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")("a a")["input_ids"]
    fields = SPM_FIELDS | ({} if flag is None else {"tokenizer.ggml.add_eos_token": flag})
    assert from_gguf_metadata(fields).encode("a a") == want == [1, 5, 5] + [2] * bool(flag)


def test_end_of_message_ids_stop_generation():
    """llama.cpp ends generation at EOS, EOT and EOM: Llama 3.1's <|eom_id|> (named by the key, or found by its
    text as llama.cpp finds it) ends a tool call."""
    tokens = [*byte_level_alphabet(), "<bos>", "<eos>", "<|eot_id|>", "<|eom_id|>"]
    fields = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [1] * 256 + [3] * 4}
    assert from_gguf_metadata(byte_level_fields(**fields)).stop_ids == (257, 258, 259)
    fields["tokenizer.ggml.tokens"] = [*tokens[:-1], "<|tool_end|>"]
    tok = from_gguf_metadata(byte_level_fields(**fields, **{"tokenizer.ggml.eom_token_id": 259}))
    assert tok.stop_ids == (257, 258, 259)


def test_sentencepiece_decode_skips_ids_past_the_vocabulary_and_bad_byte_tokens_are_refused():
    """A model whose embeddings outnumber its pieces can sample an id with no piece: it decodes to nothing, as
    ``tokenizers`` decodes it (it raised IndexError, and a negative id read the last piece)."""
    tok = from_gguf_metadata(SPM_FIELDS)
    assert tok.decode([5, 99, -1, 5]) == "a a"
    fields = SPM_FIELDS | {"tokenizer.ggml.tokens": [*SPM_FIELDS["tokenizer.ggml.tokens"][:5], "<0xZZ>"]}
    fields["tokenizer.ggml.token_type"] = [2, 3, 3, 1, 1, 6]
    with pytest.raises(TokenizerError, match=r"byte token 5 is '<0xZZ>', not of the form <0xXX> in tokenizer"):
        from_gguf_metadata(fields)


def test_a_mixture_of_experts_llama_file_is_refused_as_such(tmp_path, rng):
    """Mixtral is converted as ``llama`` with ``expert_count``: refused for what it is, not for a missing tensor."""
    write_tiny_gguf(tmp_path / "m.gguf", rng, fields={"expert_count": 8, "expert_used_count": 2})
    with pytest.raises(ModelLoadError, match=r"unsupported llama.expert_count=8 in .*: jkv runs dense MLPs only"):
        load_gguf(tmp_path / "m.gguf", "f32", progress=False, with_tokenizer=False)


def test_a_tokenizer_error_comes_before_the_weights_load(tmp_path, rng, monkeypatch):
    """A file whose tokenizer jkv cannot build is refused before its weights are read (minutes for a large model),
    as a directory's tokenizer.json is; a file without tokenizer metadata loads with no tokenizer, as a directory
    without tokenizer.json does (the CLI then says that it has none)."""
    from jkv.loading import gguf as gguf_loader

    write_tiny_gguf(tmp_path / "bert.gguf", rng, tokenizer="bert")
    write_tiny_gguf(tmp_path / "none.gguf", rng, tokenizer=None, fields={"vocab_size": 300})
    with monkeypatch.context() as patch:
        patch.setattr(gguf_loader, "build_params", lambda *a, **k: pytest.fail("the weights were loaded"))
        with pytest.raises(TokenizerError, match="unsupported tokenizer model 'bert'"):
            load_gguf(tmp_path / "bert.gguf", "f32", progress=False)
    assert load_gguf(tmp_path / "none.gguf", "f32", progress=False).tokenizer is None
