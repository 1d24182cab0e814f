"""The package's shape: ``import jneox`` stays light, the import graph has no cycle, and imports sit at
the top of their module (optional dependencies excepted), so the graph a reader sees is the real one.

The graph is read from the source with ``ast`` (every ``import`` statement, at module level and inside
functions, relative imports resolved), not from what one run happens to import."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
HEAVY = ("jneox.serve", "jneox.train", "jneox.evaluate", "jneox.export")

# Modules outside jneox that may be imported inside a function: optional dependencies (not in
# pyproject's runtime dependencies), each with the reason it is not imported at the top.
INLINE_ALLOWED = {
    "matplotlib": "the train extra: only `jneox train-report` and --report draw",
    "emoji": "the ja extra: only JSQuAD's harness normalisation needs it",
    "neologdn": "the ja extra: only JSQuAD's harness normalisation needs it",
    "fugashi": "the ja extra: only JSQuAD's harness tokenisation needs it",
    "huggingface_hub": "a runtime dependency, but slow to import and needed only for a hub id",
    "datasets": "optional: only `jneox tokenize` of a saved Hugging Face dataset reads it",
}



# ---- reading the graph -------------------------------------------------------------------
def modules(src: Path, package: str) -> dict[str, Path]:
    """Every module of ``package`` under ``src``, by dotted name (a package by its own name)."""
    out = {}
    for path in sorted((src / package.replace(".", "/")).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(tree: ast.Module):
    """(node, inside a function) for every import statement."""
    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function
            yield from walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
    yield from walk(tree, False)


def _targets(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, known: dict) -> list[str]:
    """The modules an import statement names (absolute dotted names, not only jneox's)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        module = ".".join(base + ([node.module] if node.module else []))
    else:
        module = node.module
    # `from pkg import name` imports pkg.name when that is a module
    subs = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in known]
    return subs if subs and len(subs) == len(node.names) else [module, *subs]


def import_graph(src: Path, package: str = "jneox") -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    """(edges between the package's modules, inline imports by module). An edge also runs to each
    package above a target that the importer is not itself inside (importing a.b.c runs a.b's
    __init__); the root package is left out, since every module is inside it."""
    known = modules(src, package)
    edges: dict[str, set[str]] = {m: set() for m in known}
    inline: dict[str, list[str]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node, in_function in _imports(tree):
            for target in _targets(node, name, path.name == "__init__.py", known):
                if in_function:
                    inline.setdefault(name, []).append(f"{target} (line {node.lineno})")
                parts = target.split(".")
                for i in range(2, len(parts) + 1):
                    t = ".".join(parts[:i])
                    if t in known and t != name and not (name + ".").startswith(t + ".") \
                            and (i == len(parts) or t != package):
                        edges[name].add(t)
    return edges, inline


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path that returns to its start) per strongly connected component of more than one module."""
    index, low, stack, on_stack, comps, counter = {}, {}, [], set(), [], [0]

    def strongconnect(v):  # Tarjan
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(set(comp))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    out = []
    for comp in comps:
        start = min(comp)
        path, seen = [start], {start}
        def dfs(v):  # a path inside the component back to start
            for w in sorted(edges[v] & comp):
                if w == start:
                    return True
                if w not in seen:
                    seen.add(w)
                    path.append(w)
                    if dfs(w):
                        return True
                    path.pop()
            return False
        dfs(start)
        out.append(path + [start])
    return out


def forbidden_inline(inline: dict[str, list[str]], package: str = "jneox") -> dict[str, list[str]]:
    """The inline imports that are neither of an allowed optional dependency nor of ``__future__``."""
    out = {}
    for module, targets in inline.items():
        bad = [t for t in targets if t.split(" ")[0].split(".")[0] not in INLINE_ALLOWED]
        if bad:
            out[module] = bad
    return out


# ---- the checks ---------------------------------------------------------------------------
def test_import_jneox_loads_no_heavy_subpackage():
    code = "import sys, jneox; print('\\n'.join(sorted(m for m in sys.modules if m.startswith('jneox'))))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    loaded = proc.stdout.split()
    assert "jneox.loading" in loaded  # the check sees jneox's own modules
    assert not [m for m in loaded if m.startswith(HEAVY)], loaded


def test_import_graph_has_no_cycle():
    edges, _ = import_graph(SRC)
    assert {"jneox.loading", "jneox.checkpoint", "jneox.cli.tools"} <= set(edges)
    found = cycles(edges)
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_imports_are_at_the_top():
    _, inline = import_graph(SRC)
    bad = forbidden_inline(inline)
    assert not bad, "imports inside functions: " + "; ".join(f"{m}: {', '.join(t)}" for m, t in bad.items())


def test_the_checks_see_a_cycle_and_an_inline_import(tmp_path):
    """The checks above on a package made to fail them: a cycle through a function-level import, and
    an inline import of a runtime dependency next to an allowed one."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n    import numpy\n    import matplotlib\n")
    (pkg / "c.py").write_text("from . import a\ng = 1\n")
    (pkg / "d.py").write_text("from .sub.b import f\n")  # no cycle through d
    edges, inline = import_graph(tmp_path, "pkg")
    assert edges["pkg.a"] == {"pkg.sub", "pkg.sub.b"} and edges["pkg.c"] == {"pkg.a"}
    assert cycles(edges) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]
    assert forbidden_inline(inline) == {"pkg.sub.b": ["pkg.c (line 2)", "numpy (line 3)"]}


# ---- the drawing in docs/design.md ----------------------------------------------------------
DESIGN = SRC.parent / "docs" / "design.md"
GRAPH_START, GRAPH_END = "<!-- import-graph:start -->", "<!-- import-graph:end -->"


def collapsed(edges: dict[str, set[str]], package: str = "jneox") -> dict[str, set[str]]:
    """The graph with each subpackage drawn as one node (``jneox.serve.app`` -> ``serve``) and the
    top-level modules by their own name, so the drawing stays readable."""
    def node(m: str) -> str:
        return m.split(".")[1] if m != package else package
    out: dict[str, set[str]] = {}
    for m, ts in edges.items():
        if m == package:
            continue
        out.setdefault(node(m), set()).update(node(t) for t in ts if node(t) != node(m) and t != package)
    return out


def mermaid(edges: dict[str, set[str]]) -> str:
    lines = ["```mermaid", "graph TD"]
    for m in sorted(edges):
        lines += [f"    {m} --> {t}" for t in sorted(edges[m])] or [f"    {m}"]
    return "\n".join(lines + ["```"])


def _design_block() -> str:
    text = DESIGN.read_text(encoding="utf-8")
    return text.split(GRAPH_START, 1)[1].split(GRAPH_END, 1)[0].strip()


def test_design_page_draws_the_import_graph():
    """docs/design.md's drawing is the graph of the code (`python tests/test_imports.py` redraws it)."""
    drawn = collapsed(import_graph(SRC)[0])
    assert not cycles(drawn) or pytest.fail("the drawn graph has a cycle: " + str(cycles(drawn)))
    assert _design_block() == mermaid(drawn), "docs/design.md's import graph is stale: run python tests/test_imports.py"


if __name__ == "__main__":  # redraw docs/design.md's import graph
    text = DESIGN.read_text(encoding="utf-8")
    head, rest = text.split(GRAPH_START, 1)
    DESIGN.write_text(f"{head}{GRAPH_START}\n{mermaid(collapsed(import_graph(SRC)[0]))}\n{GRAPH_END}"
                      f"{rest.split(GRAPH_END, 1)[1]}", encoding="utf-8")
    print(f"redrew the import graph in {DESIGN}")
