"""Tokenizer pieces that the model files do not reach: chat-template rendering with and without jinja2, streaming
of characters split across byte tokens, and every tokenizer error."""

import sys

import pytest
from helpers_loading import byte_level_alphabet

from jkv.loading import tokenizer as tok_lib
from jkv.loading.tokenizer import TokenizerError

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def byte_level(chat_template=None, **fields):
    """A byte-level BPE tokenizer (no merges) built from GGUF-style metadata."""
    tokens = [*byte_level_alphabet(), "<|im_start|>", "<|im_end|>"]
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": [],
        "tokenizer.ggml.token_type": [1] * 256 + [3, 3],
        "tokenizer.ggml.eos_token_id": 257,
        "tokenizer.chat_template": chat_template,
    }
    return tok_lib.from_gguf_metadata(meta | fields)


@pytest.fixture
def no_jinja(monkeypatch):
    """Make ``import jinja2`` fail, as on a machine without it."""

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name == "jinja2" or name.startswith("jinja2."):
                raise ImportError("jinja2 is not installed")

    for name in [m for m in sys.modules if m == "jinja2" or m.startswith("jinja2.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [Block(), *sys.meta_path])


MESSAGES = [{"role": "user", "content": "héllo"}]
CHATML_TEXT = "<|im_start|>user\nhéllo<|im_end|>\n<|im_start|>assistant\n"


def test_chatml_with_and_without_jinja2(monkeypatch, no_jinja):
    t = byte_level(CHATML)
    assert t.render_chat(MESSAGES) == CHATML_TEXT  # the built-in ChatML fallback
    with pytest.raises(TokenizerError, match=r"rendering this chat template needs jinja2 \(pip install jinja2\)"):
        byte_level("{{ messages[0]['content'] }}").render_chat(MESSAGES)
    monkeypatch.undo()
    assert byte_level(CHATML).render_chat(MESSAGES) == CHATML_TEXT  # through jinja2
    ids = t.encode(CHATML_TEXT)
    assert ids[0] == 256 and t.decode(ids) == CHATML_TEXT and t.stop_ids == (257,)


def test_stream_decoder_holds_back_split_characters():
    t = byte_level()
    text = "a🙂é東b"
    ids = t.encode(text)
    assert len(ids) == len(text.encode())  # one token per byte: characters span several tokens
    stream = t.stream()
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == text
    assert [p for p in pieces if p] == ["a", "🙂", "é", "東", "b"]  # never half a character


TEMPLATE_ERRORS = {
    "no-template": (None, "this model has no chat template: pass the prompt as raw text instead"),
    "template-raises": ("{{ raise_exception('roles must alternate') }}", "chat template: roles must alternate"),
    "template-syntax": ("{% for m in messages %}", "cannot render the model's chat template"),
}


@pytest.mark.parametrize("case", list(TEMPLATE_ERRORS))
def test_chat_template_errors(case):
    template, message = TEMPLATE_ERRORS[case]
    with pytest.raises(TokenizerError, match=message):
        byte_level(template).render_chat(MESSAGES)


METADATA_ERRORS = {
    "no-merges": ({"tokenizer.ggml.merges": None}, "lacks tokenizer.ggml.tokens or tokenizer.ggml.merges"),
    "no-tokens": ({"tokenizer.ggml.tokens": []}, "lacks tokenizer.ggml.tokens or tokenizer.ggml.merges"),
    "types-length": ({"tokenizer.ggml.token_type": [1, 1]}, "has 258 tokens but 2 token types"),
    "unigram": ({"tokenizer.ggml.model": "t5"}, "unsupported tokenizer model 't5'"),
}


@pytest.mark.parametrize("case", list(METADATA_ERRORS))
def test_gguf_metadata_errors(case):
    fields, message = METADATA_ERRORS[case]
    with pytest.raises(TokenizerError, match=message):
        byte_level(**fields)


def test_malformed_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 42}')
    with pytest.raises(TokenizerError, match=r"cannot read '.*tokenizer\.json'"):
        tok_lib.from_hf_directory(tmp_path)


def test_an_unknown_hf_pre_tokenizer_is_named_with_the_known_ones(tmp_path):
    """A tokenizer.json of a newer ``tokenizers`` (a step of its pre-tokenizer this one lacks) is refused naming
    that step, not with serde's "did not match any variant of untagged enum"."""
    import json

    word_directory(tmp_path, False, SPECIALS)
    config = json.loads((tmp_path / "tokenizer.json").read_text())
    steps = [{"type": "Digits", "individual_digits": True}, {"type": "FancySplit", "pattern": "x"}]
    config["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": steps}
    (tmp_path / "tokenizer.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=r"pre_tokenizer type 'FancySplit' is not one .*knows \(BertPre.*Split"):
        tok_lib.from_hf_directory(tmp_path)


def word_directory(directory, post_bos: bool, config: dict):
    """An HF directory's tokenizer: words ``w3``... after ``<pad> <bos> <eos>``, its ``tokenizer.json``
    post-processor prepending ``<bos>`` when ``post_bos`` (as Llama 3's does), and ``config`` as
    ``tokenizer_config.json``."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["<pad>", "<bos>", "<eos>"]
    vocab = {t: i for i, t in enumerate(specials)} | {f"w{i}": i for i in range(3, 40)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    if post_bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


SPECIALS = {"bos_token": "<bos>", "eos_token": "<eos>", "tokenizer_class": "PreTrainedTokenizerFast"}


@pytest.mark.parametrize(
    "post_bos,config",
    [(True, SPECIALS), (False, SPECIALS), (True, SPECIALS | {"add_bos_token": True})],
    ids=["post-processor-bos(llama3)", "no-bos", "add_bos_token"],
)
def test_hf_directory_bos_as_transformers_adds_it(tmp_path, post_bos, config):
    """Without ``add_bos_token`` in tokenizer_config.json (Llama 3), BOS is what tokenizer.json's post-processor
    adds, as transformers' tokenizer does."""
    transformers = pytest.importorskip("transformers")
    directory = word_directory(tmp_path, post_bos, config)
    want = transformers.AutoTokenizer.from_pretrained(directory)("w5 w6")["input_ids"]
    assert tok_lib.from_hf_directory(directory).encode("w5 w6") == want


@pytest.mark.parametrize("text", ["{oops", "[1, 2]"], ids=["not-json", "not-an-object"])
def test_malformed_tokenizer_config_json(tmp_path, text):
    word_directory(tmp_path, False, {})
    (tmp_path / "tokenizer_config.json").write_text(text)
    with pytest.raises(TokenizerError, match=r"'.*tokenizer_config\.json' .*JSON object"):
        tok_lib.from_hf_directory(tmp_path)


TEMPLATES = {  # tokenizer_config.json's chat_template forms that transformers renders
    "named-list": [
        {"name": "default", "template": "{% for m in messages %}<bos>{{ m['content'] }}{% endfor %}"},
        {"name": "tool_use", "template": "tools"},
    ],
    "loop-controls": "{% for m in messages %}{{ m['content'] }}{% if loop.first %}{% break %}{% endif %}{% endfor %}",
    "strftime-now": "{{ strftime_now('%Y') }} {{ messages[0]['content'] }}",
    "tojson": "{{ {'args': messages[0]['content'] + \" <é&'>\"} | tojson }}{{ [1, 2] | tojson(indent=2) }}",
}


@pytest.mark.parametrize("case", list(TEMPLATES))
def test_hf_directory_chat_template_renders_as_transformers_does(tmp_path, case):
    transformers = pytest.importorskip("transformers")
    directory = word_directory(tmp_path, False, SPECIALS | {"chat_template": TEMPLATES[case]})
    messages = [{"role": "user", "content": "w5 w6"}, {"role": "user", "content": "w7"}]
    want = transformers.AutoTokenizer.from_pretrained(directory).apply_chat_template(messages, tokenize=False)
    assert tok_lib.from_hf_directory(directory).render_chat(messages) == want


STOPS = {  # files beside the tokenizer -> the stop ids (<eos> is 2)
    "generation-list": ({"generation_config.json": {"eos_token_id": [2, 7, 9]}}, (2, 7, 9)),
    "generation-int": ({"generation_config.json": {"eos_token_id": 7}, "config.json": {"eos_token_id": 9}}, (2, 7)),
    "config-only": ({"config.json": {"eos_token_id": [9, 11]}}, (2, 9, 11)),
    "generation-without": ({"generation_config.json": {"do_sample": True}, "config.json": {"eos_token_id": 9}}, (2,)),
    "none": ({}, (2,)),
}


@pytest.mark.parametrize("case", list(STOPS))
def test_hf_directory_stops_where_transformers_generate_stops(tmp_path, case):
    """``eos_token_id`` of generation_config.json, else of config.json, as HF's ``generate`` reads it (Phi-3 ends a
    chat turn with <|end|>, which only generation_config.json names), beside the tokenizer's EOS."""
    import json

    transformers = pytest.importorskip("transformers")
    files, want = STOPS[case]
    directory = word_directory(tmp_path, False, SPECIALS)
    for name, fields in files.items():
        (directory / name).write_text(json.dumps(fields))
    assert tok_lib.from_hf_directory(directory).stop_ids == want
    if "generation_config.json" in files:
        hf = transformers.GenerationConfig.from_pretrained(directory).eos_token_id
        assert {2} | set(hf if isinstance(hf, list) else [] if hf is None else [hf]) == set(want)


@pytest.mark.parametrize("value", ["7", 40, [2, -1], True], ids=["string", "past-vocab", "negative", "bool"])
def test_hf_directory_bad_generation_eos(tmp_path, value):
    import json

    directory = word_directory(tmp_path, False, SPECIALS)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": value}))
    with pytest.raises(TokenizerError, match=r"generation_config\.json'?: eos_token_id=.* expected a token id"):
        tok_lib.from_hf_directory(directory)


def test_a_lone_surrogate_is_refused_naming_it():
    """Text holding a lone surrogate (undecodable bytes as Python hands them over) has no UTF-8 bytes to encode."""
    with pytest.raises(ValueError, match=r"text holds \\udce9 at index 3, a lone surrogate, which is not Unicode"):
        byte_level().encode("caf\udce9")
