"""The README's runnable examples run as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
RUNNABLE = re.compile(r"```python\n# runnable\n(.*?)```", flags=re.S)


def runnable_blocks(path: pathlib.Path) -> list:
    """The compiled ``# runnable`` python blocks of a Markdown file, in order; a traceback names the file's lines."""
    text = path.read_text()
    blocks = []
    for match in RUNNABLE.finditer(text):
        first_line = text[: match.start(1)].count("\n")  # lines before the block's code
        blocks.append(compile("\n" * first_line + match.group(1), str(path), "exec"))
    return blocks


BLOCKS = runnable_blocks(README)


def test_readme_has_runnable_examples():
    assert BLOCKS, "README.md lost its runnable examples"


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code):
    exec(code, {})
