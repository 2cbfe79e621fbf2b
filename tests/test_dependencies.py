"""The dependency rules of DESIGN.md ("Dependency rules"), checked on the import statements of every module of
jkv/ and pallas_kernels/: read with ``ast``, so imports at any depth count, function-local ones included (a local
import that closes a cycle is still a cycle). Rules are written for the target packages; a group with no module
yet is simply not checked."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jkv", "pallas_kernels")

# Module-name prefix -> group (the longest matching prefix wins). ``jkv`` itself (the package's __init__, which
# re-exports the public API) is the group "api".
GROUPS = {
    "pallas_kernels": "kernels",
    "jkv.parallel": "parallel",
    "jkv.caches": "caches",
    "jkv.attention": "attention",
    "jkv.models": "models",
    "jkv.loading": "loading",
    "jkv.serving": "serving",
    "jkv.serving.server": "server",
    "jkv.server": "server",
    "jkv.integrations": "integrations",
    "jkv.memory": "memory",
    "jkv.cli": "cli",
    "jkv.cli_parser": "cli",
}
# Today's flat modules, by the group they move into. Delete a row when its module is gone.
FLAT_MODULES = {
    "jkv.rope": "attention",  # positions of queries and keys: used by models and integrations alike
    "jkv.xla_flags": "cli",
}
JKV = frozenset({*GROUPS.values(), "api"} - {"kernels"})

# Group | groups it must not import | the rule. Imports inside a group are free.
RULES = [
    ("kernels", JKV, "pallas_kernels imports nothing from jkv"),
    ("parallel", JKV - {"parallel"}, "jkv.parallel knows no cache and no model"),
    (
        "caches",
        {"attention", "models", "loading", "serving", "server", "cli", "integrations", "api"},
        "caches know no attention, model, serving, loading or CLI",
    ),
    ("attention", JKV - {"attention", "caches", "parallel"}, "attention knows caches, kernels and parallel only"),
    (
        "models",
        {"loading", "serving", "server", "cli", "integrations", "api"},
        "models know caches, attention and parallel (and their own sharding rules), not serving or the CLI",
    ),
    (
        "loading",
        {"caches", "attention", "serving", "server", "cli", "integrations", "api"},
        "loading produces a config and params: no serving, attention or caches",
    ),
    ("serving", {"server", "cli"}, "serving knows models and below, not the CLI or the server"),
    (
        "integrations",
        {"models", "loading", "serving", "server", "cli", "api"},
        "integrations know caches and attention",
    ),
    (
        "memory",
        {"attention", "models", "loading", "serving", "server", "cli", "integrations", "api"},
        "memory plans cache sizes: it knows caches only",
    ),
]


# ---------------------------------------------------------------------------------------------- the checker
def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def scan(root: Path = ROOT, packages=PACKAGES) -> dict[str, set[str]]:
    """``{module: modules of ``packages`` it imports}`` over every ``.py`` file under ``root / package``."""
    files = {module_name(p, root): p for package in packages for p in sorted((root / package).rglob("*.py"))}
    graph = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's package, one level up per extra dot
                    base = module if is_package else module.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module
                # ``from package import name``: the submodule when ``name`` is one, else the package.
                names.update(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names)
        deps = set()
        for name in names:
            while name and name not in files:  # an attribute path: the longest prefix that is a module
                name = name.rpartition(".")[0]
            if name and name != module:
                deps.add(name)
        graph[module] = deps
    return graph


def group_of(module: str) -> str:
    if module in FLAT_MODULES:
        return FLAT_MODULES[module]
    if module == "jkv":
        return "api"
    prefixes = [p for p in GROUPS if module == p or module.startswith(p + ".")]
    if not prefixes:
        raise KeyError(f"module {module} belongs to no group: add it to GROUPS (or FLAT_MODULES) in this test")
    return GROUPS[max(prefixes, key=len)]


def violations(graph: dict[str, set[str]]) -> list[str]:
    """One line per import that breaks a rule: who imports what, and the rule."""
    out = []
    for module, deps in sorted(graph.items()):
        group = group_of(module)
        for dep in sorted(deps):
            dep_group = group_of(dep)
            for rule_group, forbidden, rule in RULES:
                if rule_group == group != dep_group and dep_group in forbidden:
                    out.append(f"{module} ({group}) imports {dep} ({dep_group}): {rule}")
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None when the module graph has none."""
    state = {}  # module -> "open" while on the DFS path, "done" after
    path = []

    def visit(module):
        state[module] = "open"
        path.append(module)
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                return [*path[path.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


# ---------------------------------------------------------------------------------------------- the checks
@pytest.fixture(scope="module")
def graph():
    return scan()


def test_every_module_is_scanned_and_grouped(graph):
    assert {"jkv", "jkv.parallel", "jkv.models.llama.model", "pallas_kernels.backend"} <= set(graph)
    assert "jkv.attention" in graph["jkv.models.llama.model"]  # function-level and module-level imports both read
    ungrouped = []
    for module in graph:
        try:
            group_of(module)
        except KeyError as e:
            ungrouped.append(str(e))
    assert not ungrouped, "\n".join(ungrouped)
    stale = sorted(set(FLAT_MODULES) - set(graph))
    assert not stale, f"FLAT_MODULES rows for modules that are gone (delete them): {stale}"


def test_dependency_rules(graph):
    broken = violations(graph)
    assert not broken, "imports that break DESIGN.md's dependency rules:\n" + "\n".join(broken)


def test_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# ---------------------------------------------------------------------------------------------- the checker can fail
def test_a_forbidden_edge_and_a_cycle_are_reported():
    fake = {
        "jkv.caches.base": {"jkv.attention.api"},  # caches know no attention
        "jkv.attention.api": {"jkv.caches.base", "jkv.parallel"},
        "jkv.parallel": set(),
        "pallas_kernels.decode": {"jkv.parallel"},  # kernels import nothing from jkv
        "jkv.serving.engine": {"jkv.models.llama", "jkv.attention.api"},  # allowed
        "jkv.models.llama": {"jkv.attention.api"},
    }
    assert violations(fake) == [
        "jkv.caches.base (caches) imports jkv.attention.api (attention): "
        "caches know no attention, model, serving, loading or CLI",
        "pallas_kernels.decode (kernels) imports jkv.parallel (parallel): pallas_kernels imports nothing from jkv",
    ]
    assert find_cycle(fake) == ["jkv.attention.api", "jkv.caches.base", "jkv.attention.api"]
    fake["jkv.caches.base"] = set()
    assert find_cycle(fake) is None
    with pytest.raises(KeyError, match=r"module jkv\.stray belongs to no group"):
        violations({"jkv.stray": set()})


def test_scan_reads_local_relative_and_from_imports(tmp_path):
    """Imports inside functions, relative imports and ``from package import submodule`` become edges."""
    pkg = tmp_path / "jkv"
    (pkg / "caches").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "caches" / "__init__.py").write_text("from .base import Cache\n")
    (pkg / "caches" / "base.py").write_text("def f():\n    from jkv.attention import api\n    return api\n")
    (pkg / "attention").mkdir()
    (pkg / "attention" / "__init__.py").write_text("")
    (pkg / "attention" / "api.py").write_text("from ..caches import base\nimport numpy\n")
    graph = scan(tmp_path, ("jkv",))
    assert graph == {
        "jkv": set(),
        "jkv.caches": {"jkv.caches.base"},
        "jkv.caches.base": {"jkv.attention.api"},
        "jkv.attention": set(),
        "jkv.attention.api": {"jkv.caches.base"},
    }
    assert violations(graph) and find_cycle(graph) == ["jkv.attention.api", "jkv.caches.base", "jkv.attention.api"]
