"""The README's runnable examples run as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n# runnable\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_runnable_examples():
    assert BLOCKS, "README.md lost its runnable examples"


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code):
    exec(compile(code, str(README), "exec"), {})
