"""The ``jkv`` command's entry point. Loading ``jkv.cli`` imports JAX and the kernels (seconds). A Ctrl-C then
would land wherever the interpreter is, JAX's garbage-collection callback included, which swallows it, and the
command would go on as if never interrupted; so while it loads, SIGINT only marks the command interrupted, and
once loaded it ends as a Ctrl-C later does (``jkv: interrupted``, status 130)."""

from __future__ import annotations

import importlib
import signal
import sys


def main(argv: list[str] | None = None) -> int:
    interrupted = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    except ValueError:  # not the main thread: signals are not ours to take
        previous = None
    try:
        cli = importlib.import_module("jkv.cli")
    except KeyboardInterrupt:
        interrupted.append(signal.SIGINT)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if interrupted:
        print("\njkv: interrupted", file=sys.stderr)
        return 130
    return cli.main(argv)
