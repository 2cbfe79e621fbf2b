"""Streaming text: characters split over byte tokens come out whole, special tokens are skipped as in the whole
decode, and stop strings cut the text even when they span pieces."""

import numpy as np
import pytest
from helpers_loading import byte_level_alphabet

from jkv.loading import tokenizer as tok_lib
from jkv.server.text import TextStream


@pytest.fixture(scope="module")
def tok():
    """Byte-level BPE without merges: every UTF-8 byte is its own token, so multi-byte characters always split."""
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": [*byte_level_alphabet(), "<|im_start|>", "<|im_end|>"],
        "tokenizer.ggml.merges": [],
        "tokenizer.ggml.token_type": [1] * 256 + [3, 3],
        "tokenizer.ggml.eos_token_id": 257,
    }
    return tok_lib.from_gguf_metadata(meta)


TEXT = "Grüße, 世界! 🍎 naïve café — done"


def test_multibyte_characters_stream_whole(tok):
    ids = tok.encode(TEXT)
    assert len(ids) == len(TEXT.encode()) > len(TEXT)  # one token per byte
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.finish() == TEXT == stream.text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[ids.index(0xF0) : ids.index(0xF0) + 3] == ["", "", ""]  # 🍎's first three bytes wait


def test_special_tokens_are_skipped_and_an_unfinished_character_ends_as_decoded(tok):
    ids = [*tok.encode("a"), 256, *tok.encode("b"), *"🍎".encode()[:2]]
    stream = TextStream(tok)
    text = "".join(stream.push(i) for i in ids) + stream.finish()
    assert text == tok.decode(ids, skip_special=True) and text.startswith("ab")


@pytest.mark.parametrize("stop", ["世界", "é —", "Grü", "done", "x"])
def test_stop_strings_cut_across_pieces(tok, stop):
    rng = np.random.default_rng(len(stop))
    stream = TextStream(tok, [stop, "never"])
    pieces = []
    for i in tok.encode(TEXT):
        pieces.append(stream.push(i))
        if stream.stopped:
            break
    pieces.append(stream.finish())
    want = TEXT[: TEXT.index(stop)] if stop in TEXT else TEXT
    assert "".join(pieces) == want == stream.text and stream.stopped == (stop in TEXT)
    if stream.stopped:
        assert stream.push(int(rng.integers(0, 256))) == "" and stream.finish() == ""  # nothing after a stop


@pytest.mark.parametrize("kind", ["text_completion", "chat.completion"])
@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("model", ["jkv", 'odd "model"\n\x00piece\x00'])
def test_streamed_piece_events_are_the_chunks_they_stand_for(tok, kind, include_usage, model):
    """``Run.piece_event`` renders a chunk once and splices each piece in: the same bytes as rendering each chunk
    whole, for pieces JSON must escape (quotes, backslashes, control characters, non-ASCII, lone surrogates' text),
    and for a model name that holds its marker (the slow path)."""
    import asyncio

    from jkv.server.generation import Run
    from jkv.server.metrics import ServerMetrics

    pieces = ["", "plain", 'a "quote" \\ back', "new\nline\ttab\x00nul\x1f", "Grüße 世界 🍎", "\x00piece\x00", "\u2028"]

    async def render():
        run = Run(None, ServerMetrics(), tok, [1, 2], None, (), kind, model)
        event = run.piece_event(include_usage)
        return [(event(p), run.chunk([run._choice(p, None)], None, include_usage)) for p in pieces]

    for fast, whole in asyncio.run(render()):
        assert fast == whole
