"""``jkv generate --model DIR`` and ``--model FILE.gguf`` on each family: a small random HF model saved by
transformers with a word tokenizer (tests/helpers_families.py), and the GGUF file llama.cpp's converter would write
from it (a SentencePiece tokenizer as the converter stores one, byte-level BPE for Qwen3). The command's tokens
(recorded from the generator it calls) equal HF's greedy continuation of the prompt's ids, up to the tokenizer's
first stop token, past the window; what it prints is their text. Gemma 3 from its directory and Mistral from GGUF
run by default, the rest slow (every family's loading is checked in tests/models)."""

import pytest
from helpers_families import FAMILIES, GGUF_CASES, hf_greedy, hf_model, save_word_tokenizer, write_gguf
from helpers_smollm import load_shared

import jkv.loading
from jkv import cli
from jkv.serving import generator

VOCAB = 300  # room for the byte-level BPE's 256 byte pieces
STEPS = 24
FAST = {("gemma3", "dir"), ("mistral", "gguf")}
# 12 tokens each (BOS, words or SentencePiece characters; Qwen3's BPE merges make fewer), and a norm epsilon that
# float32 holds exactly: the GGUF file of Mistral, Qwen3 and Phi-3 loads to the model its directory loads to, so the
# second case of a family runs the first one's compiled steps.
PROMPTS = {"dir": " ".join(f"w{i}" for i in (5, 17, 33, 8, 40, 61, 9, 77, 12, 250, 3)), "gguf": "the then he"}
EPS = 2.0**-20


def cases():
    return [
        pytest.param(f, kind, marks=() if (f, kind) in FAST else pytest.mark.slow, id=f"{f}-{kind}")
        for f in FAMILIES
        for kind in ("dir", "gguf")
    ]


@pytest.mark.parametrize("family,kind", cases())
def test_generate_matches_hf_greedy(family, kind, tmp_path, monkeypatch, capsys):
    arch, overrides = GGUF_CASES[family]
    model = hf_model(family, vocab_size=VOCAB, rms_norm_eps=EPS, **(overrides if kind == "gguf" else {}))
    if kind == "dir":
        model.save_pretrained(tmp_path)
        save_word_tokenizer(tmp_path, VOCAB)
        path = str(tmp_path)
    else:
        path = str(tmp_path / f"{family}.gguf")
        write_gguf(path, model, arch, bpe=arch == "qwen3")
    monkeypatch.setattr(jkv.loading, "load", load_shared)  # the command's load below is this one
    tok = load_shared(path, "f32").tokenizer
    ids = tok.encode(PROMPTS[kind])
    want = hf_greedy(model, [ids], STEPS)[0][0]
    stops = [i for i, t in enumerate(want) if t in tok.stop_ids]
    want = want[: stops[0]] if stops else want

    results = []
    real = generator.generate_text
    monkeypatch.setattr(generator, "generate_text", lambda *a, **k: results.append(real(*a, **k)) or results[-1])
    argv = ["generate", PROMPTS[kind], "--model", path, "--raw", "--max-new-tokens", str(STEPS), "--dtype", "f32"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert len(want) == STEPS and len(ids) + STEPS > 8, "the continuation must be whole and pass the window"
    assert results[0].tokens == want
    text = tok.decode(want, skip_special=True)  # what the command streams
    assert out == text + "\n" and f"[{len(want)} tokens, " in err
