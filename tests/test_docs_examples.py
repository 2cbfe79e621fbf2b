"""The ``# runnable`` examples of docs/*.md run as written. The blocks of one doc share a namespace and run in
order (a later block builds on the earlier ones); a traceback names the doc's own lines."""

import pathlib

import jax
import pytest
from test_readme import runnable_blocks

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
EXAMPLES = {path.name: runnable_blocks(path) for path in sorted(DOCS.glob("*.md"))}
CASES = [(name, i) for name, blocks in EXAMPLES.items() for i in range(len(blocks))]

# Python blocks left unmarked on purpose: source excerpts (adding-a-format), a fragment naming the user's files
# (quant: `path`, `directory`), a client of a running server. Any other python block must be marked runnable.
FRAGMENTS = {"adding-a-format.md": 3, "quant.md": 1, "serving.md": 1}
NEEDS_DEVICES = {"sharding.md": 2}  # a mesh of tp=2 (on a CPU, tests/conftest.py's host devices)
_namespaces: dict[str, tuple[dict, int]] = {}  # doc -> (its namespace, how many of its blocks ran there)


def test_docs_have_runnable_examples():
    assert CASES, "docs/*.md lost their runnable examples"


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_other_python_block_is_runnable(name):
    unmarked = (DOCS / name).read_text().count("```python\n") - len(EXAMPLES[name])
    assert unmarked == FRAGMENTS.get(name, 0), f"{name}: {unmarked} python blocks not marked '# runnable'"


@pytest.mark.parametrize(("name", "index"), CASES, ids=[f"{name}-block{i}" for name, i in CASES])
def test_doc_example_runs(name, index):
    if jax.device_count() < NEEDS_DEVICES.get(name, 1):
        pytest.skip(f"{name} needs {NEEDS_DEVICES[name]} devices, found {jax.device_count()}")
    namespace, done = _namespaces.get(name, ({"__name__": f"docs_{name}"}, 0))
    if done > index:  # run again (pytest --count, a rerun): start the doc afresh
        namespace, done = {"__name__": f"docs_{name}"}, 0
    for i in range(done, index + 1):  # the earlier blocks first when this one runs alone (-k) or one failed
        exec(EXAMPLES[name][i], namespace)
        _namespaces[name] = (namespace, i + 1)
