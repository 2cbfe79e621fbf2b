"""`jkv generate --batch-file` (the engine) and `--tp/--dp` (a device mesh): same greedy text as one prompt alone."""

import jax
import pytest
from helpers_loading import needs_smollm

from jkv import cli

PROMPTS = ["What is the capital of France? Answer in one word.", "Name a primary colour.", "Say hello."]


def answer_alone(prompt, capsys, *extra):
    assert cli.main(["generate", prompt, "--max-new-tokens", "12", "--quiet", *extra]) == 0
    return capsys.readouterr().out.strip()


@needs_smollm
def test_batch_file_answers_equal_single_prompts(tmp_path, capsys):
    alone = [answer_alone(p, capsys) for p in PROMPTS]
    batch = tmp_path / "prompts.txt"
    batch.write_text("\n".join([PROMPTS[0], "", *PROMPTS[1:]]) + "\n")  # blank lines are skipped
    args = ["generate", "--batch-file", str(batch), "--max-new-tokens", "12", "--num-slots", "2"]
    assert cli.main([*args, "--prefix-cache-mb", "16"]) == 0
    out, err = capsys.readouterr()
    for i, (prompt, text) in enumerate(zip(PROMPTS, alone, strict=True)):
        assert f"[{i}] {prompt}\n{text}\n" in out
    assert "Paris" in alone[0]
    assert "3 requests" in err and "requests" in err  # summary line and progress bar on stderr


@needs_smollm
@pytest.mark.skipif(jax.device_count() < 3, reason="needs 3 devices")
def test_tensor_parallel_cli_matches_one_device(capsys):
    """SmolLM2 has 3 kv heads: --tp 3 splits them over 3 (host) devices and answers the same."""
    assert answer_alone(PROMPTS[0], capsys, "--tp", "3") == answer_alone(PROMPTS[0], capsys)


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
def test_tp_that_does_not_divide_the_heads_is_refused(capsys):
    assert cli.main(["generate", "hi", "--tp", "2", "--quiet"]) == 2
    assert "tp=2 must divide num_kv_heads=3" in capsys.readouterr().err
