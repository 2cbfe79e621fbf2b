"""The ``jkv`` console script's entry point (``jkv_cli``): Ctrl-C while JAX and the kernels load ends quietly."""

import os
import re
import signal
import types
from pathlib import Path

import pytest

import jkv_cli


@pytest.mark.parametrize("how", ["signal", "exception"])
def test_interrupt_while_loading_ends_as_an_interrupt(monkeypatch, capsys, how):
    """A SIGINT during the import (which JAX's callbacks could swallow) or a KeyboardInterrupt out of it: the command
    stops with status 130 once the import is over, the CLI never runs, and SIGINT's handler is restored."""
    ran = []

    def loading(name):
        assert name == "jkv.cli"
        if how == "exception":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: only marks the command interrupted
        return types.SimpleNamespace(main=lambda argv: ran.append(argv) or 0)

    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(jkv_cli.importlib, "import_module", loading)
    assert jkv_cli.main(["generate", "hi"]) == 130
    captured = capsys.readouterr()
    assert captured.err == "\njkv: interrupted\n" and captured.out == "" and not ran
    assert signal.getsignal(signal.SIGINT) is before


def test_runs_the_cli_once_loaded(monkeypatch):
    import jkv.cli

    seen = []
    monkeypatch.setattr(jkv.cli, "main", lambda argv: seen.append(argv) or 7)
    assert jkv_cli.main(["serve", "--port", "1"]) == 7 and seen == [["serve", "--port", "1"]]


def test_the_console_script_is_this_entry_point():
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    scripts = re.search(r"^\[project\.scripts\]\n(.*?)(?:\n\n|\Z)", text, re.S | re.M).group(1)
    assert scripts.strip() == 'jkv = "jkv_cli:main"'
