"""SentencePiece vocabularies from GGUF metadata (jkv.loading.spm) against the ``sentencepiece`` library itself:
a small BPE model with byte fallback is trained here and written into the ``tokenizer.*`` fields as llama.cpp's
converter writes them (pieces, scores, token types); jkv's ids and text equal sentencepiece's."""

import io

import pytest

from jkv.loading.tokenizer import TokenizerError, from_gguf_metadata

spm = pytest.importorskip("sentencepiece")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello there: the world says hello back.",
    "Sliding windows keep the last positions of every local layer.",
    "Numbers 123 and 4567 appear, as do tabs\tand new\nlines.",
] * 20
TEXTS = [
    "Hello world",
    "the lazy dog jumps over the quick fox",
    "  two  spaces, then one",
    "naïve café ☕ 日本語",  # characters outside the vocabulary: byte fallback
    "tabs\tand\nnew lines 98765",
    "",
]


@pytest.fixture(scope="module")
def sentencepiece():
    """(sentencepiece processor, its GGUF tokenizer fields)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=400, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    n = sp.get_piece_size()

    def kind(i):  # the converter's SentencePieceTokenTypes
        return 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i) else 6 if sp.is_byte(i) else 1

    fields = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [float(sp.get_score(i)) for i in range(n)],
        "tokenizer.ggml.token_type": [kind(i) for i in range(n)],
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
    }
    return sp, fields


@pytest.mark.parametrize("text", TEXTS)
def test_ids_and_text_match_sentencepiece(sentencepiece, text):
    sp, fields = sentencepiece
    tok = from_gguf_metadata(fields)
    want = sp.encode(text)
    assert tok.encode(text) == [sp.bos_id(), *want] and tok.encode(text, add_bos=False) == want
    assert tok.decode(want) == sp.decode(want) == text
    if "☕" in text:
        assert any(sp.is_byte(i) for i in want), "byte fallback not exercised"


def test_random_strings_match_sentencepiece(sentencepiece, rng):
    """Strings of the corpus's characters in random order, where the merge order decides the pieces."""
    sp, fields = sentencepiece
    tok = from_gguf_metadata(fields)
    chars = sorted(set("".join(CORPUS)))
    for _ in range(30):
        text = "".join(rng.choice(chars, int(rng.integers(1, 40))))
        assert tok.encode(text, add_bos=False) == sp.encode(text), repr(text)


def test_special_tokens_in_text_and_stops(sentencepiece):
    """A control token written in the text maps to its id, and the text after it starts a new word (llama.cpp)."""
    sp, fields = sentencepiece
    tok = from_gguf_metadata(fields | {"tokenizer.ggml.add_bos_token": False})
    assert tok.encode("hello</s>world") == [*sp.encode("hello"), sp.eos_id(), *sp.encode("world")]
    assert tok.stop_ids == (sp.eos_id(),) and tok.vocab_size == sp.get_piece_size()
    assert tok.decode([*sp.encode("hello"), sp.eos_id()], skip_special=True) == "hello"
    no_prefix = from_gguf_metadata(fields | {"tokenizer.ggml.add_space_prefix": False})
    assert no_prefix.encode("world", add_bos=False) != sp.encode("world")  # Gemma's files: no leading "▁"


def test_bad_scores_are_refused(sentencepiece):
    _, fields = sentencepiece
    with pytest.raises(TokenizerError, match="tokens but 3 token scores"):
        from_gguf_metadata(fields | {"tokenizer.ggml.scores": [0.0, 1.0, 2.0]})
    with pytest.raises(TokenizerError, match="unsupported tokenizer model 'bert'"):
        from_gguf_metadata(fields | {"tokenizer.ggml.model": "bert"})
