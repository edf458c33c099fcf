"""The structure the code is held to (STYLE.md): an import graph without cycles, networks that know nothing of
data parallelism, low-level modules that pull in no network, a loop that fits on a screen, and citations that a
reader of the repository can follow."""
import ast
import os
import re
import subprocess
import sys

import pytest

import import_graph

ROOT = import_graph.ROOT


def test_the_import_graph_has_no_cycle():
    """Every import statement counts, deferred (function-level) ones included, so that none can hide a cycle."""
    graph = import_graph.imports()
    assert len(graph) > 50   # the walk found the packages
    cycles = import_graph.cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(
        " → ".join(c) + " (" + ", ".join(f"{a} imports {b} at line {graph[a][b][0]}" for a in c for b in c
                                         if b in graph[a]) + ")" for c in cycles)


def test_networks_do_not_import_data_parallelism():
    graph = import_graph.imports()
    bad = {m: sorted(t for t in targets if t.startswith(("torch.distributed", "engine.dist")))
           for m, targets in graph.items() if m.startswith("engine.networks")}
    assert not {m: t for m, t in bad.items() if t}


@pytest.mark.parametrize("module", ["engine.files", "engine.state_dicts", "engine.unpickler"])
def test_low_level_modules_import_no_network(module):
    code = (f"import sys, {module}; bad = sorted(m for m in sys.modules if m.startswith('engine.networks') or "
            f"m in ('engine.precond', 'engine.dist', 'engine.registry', 'engine.loop')); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_files_is_a_leaf():
    """engine/files.py imports only torch and the standard library."""
    assert set(import_graph.imports()["engine.files"]) == set()


# engine/ modules allowed over 500 lines, each with the reason
LONG_MODULES: dict[str, str] = {}


def test_no_engine_module_is_over_500_lines():
    long = {}
    for name, path in import_graph.modules().items():
        n = sum(1 for _ in open(path, encoding="utf-8"))
        if name.startswith("engine") and n > 500 and name not in LONG_MODULES:
            long[name] = n
    assert not long


def _function(path: str, name: str) -> ast.FunctionDef:
    tree = ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read())
    return next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)


def test_the_loop_that_runs_the_steps_fits_on_a_screen():
    f = _function("engine/loop.py", "run_steps")
    assert f.end_lineno - f.lineno + 1 <= 80
    g = _function("engine/loop.py", "train_stage")
    assert g.end_lineno - g.lineno + 1 <= 80


# ---- citations --------------------------------------------------------------------------------------------------

SPEC_DIR = os.path.join(ROOT, "docs", "spec")
SHARED_SPEC = os.path.join(os.path.dirname(ROOT), "shared", "spec")
CITATION = re.compile(r"(?<![\w/.])(?:(docs/)?spec/|(?=(?:cm|mf|edm2_latent)\.md))(\w+)\.md((?:(?:,\s*|\s+and\s+|\s*)§\s*"
                      r"\d+(?:\.\d+)*)*)")


def _sections(path: str) -> set[str]:
    """The section numbers of a spec's headings ('## 7. Metrics' → 7, '### 7.1 FID' → 7.1)."""
    out = set()
    for line in open(path, encoding="utf-8"):
        m = re.match(r"#+\s+(\d+(?:\.\d+)*)\.?\s", line)
        if m:
            out.add(m.group(1))
    return out


def _project_files():
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode != 0:   # not a git checkout: walk the tree
        return [os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(ROOT) for f in fs
                if ".venv" not in d and ".git" not in d]
    return out.stdout.split()


def test_every_spec_citation_resolves_inside_the_repository():
    specs = {name[:-3]: _sections(os.path.join(SPEC_DIR, name)) for name in os.listdir(SPEC_DIR)}
    assert {"cm", "mf", "edm2_latent"} <= set(specs)
    bad, count = [], 0
    for rel in _project_files():
        if not rel.endswith((".py", ".md")) or rel.startswith("docs/spec/"):
            continue
        text = open(os.path.join(ROOT, rel), encoding="utf-8").read()
        for m in CITATION.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            count += 1
            name = m.group(2)
            if m.group(1) is None:
                bad.append(f"{rel}:{line}: cites {m.group(0).strip()!r}, not docs/spec/{name}.md")
            elif name not in specs:
                bad.append(f"{rel}:{line}: docs/spec/{name}.md does not exist")
            else:
                for sec in re.findall(r"§\s*(\d+(?:\.\d+)*)", m.group(3)):
                    if sec not in specs[name]:
                        bad.append(f"{rel}:{line}: docs/spec/{name}.md has no section {sec}")
    assert count > 200   # the walk saw the citations
    assert not bad, "\n".join(bad)


@pytest.mark.skipif(not os.path.isdir(SHARED_SPEC), reason="no ../shared/spec beside this checkout")
def test_spec_copies_equal_the_shared_specifications():
    for name in sorted(os.listdir(SHARED_SPEC)):
        if name.endswith(".md"):
            with open(os.path.join(SHARED_SPEC, name), "rb") as a, open(os.path.join(SPEC_DIR, name), "rb") as b:
                assert a.read() == b.read(), f"docs/spec/{name} differs from ../shared/spec/{name}: copy it again"
