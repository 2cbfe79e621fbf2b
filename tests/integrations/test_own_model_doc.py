"""docs/own-model.md's code blocks run as written, in order, in one namespace (each builds on the last)."""

import pathlib
import re

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "own-model.md"
BLOCKS = re.findall(r"```python\n# runnable\n(.*?)```", DOC.read_text(), flags=re.S)


def test_every_python_block_is_runnable():
    assert len(BLOCKS) >= 4, "docs/own-model.md lost its runnable examples"
    assert DOC.read_text().count("```python") == len(BLOCKS), "a Python block is not marked '# runnable'"


def test_doc_blocks_run():
    namespace = {}
    for i, code in enumerate(BLOCKS):
        exec(compile(code, f"{DOC}:block{i}", "exec"), namespace)
