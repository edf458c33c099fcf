"""The structure the code is held to (STYLE.md): an import graph without cycles, between modules and between
folders; folders named for their role, with recipe support apart from the core and a training package that knows
no network family; networks that know nothing of data parallelism; low-level modules that pull in no network; a
loop that fits on a screen; and citations that a reader of the repository can follow."""
import ast
import os
import re
import subprocess
import sys

import import_graph
import pytest

ROOT = import_graph.ROOT


def test_the_import_graph_has_no_cycle():
    """Every import statement counts, deferred (function-level) ones included, so that none can hide a cycle."""
    graph = import_graph.imports()
    assert len(graph) > 50   # the walk found the packages
    cycles = import_graph.cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(
        " → ".join(c) + " (" + ", ".join(f"{a} imports {b} at line {graph[a][b][0]}" for a in c for b in c
                                         if b in graph[a]) + ")" for c in cycles)


def test_the_folders_import_each_other_without_a_cycle():
    """Each subpackage of engine/ (and each flat module) is one node: no two folders import each other, directly or
    around a loop, so the folders can be read bottom to top."""
    graph = import_graph.folder_imports()
    cycles = import_graph.cycles(graph)
    assert not cycles, "folder-level import cycles: " + "; ".join(
        " → ".join(c) + " (" + "; ".join(graph[a][b][0] for a in c for b in c if b in graph[a]) + ")" for c in cycles)


def test_only_recipes_bench_and_tests_import_the_pipelines():
    """engine/pipelines/ exists only for recipes: nothing else in the engine may depend on it."""
    bad = [f"{m} imports {t} at line {lines[0]}" for m, targets in import_graph.imports().items()
           if not m.startswith("engine.pipelines") for t, lines in targets.items()
           if t.startswith("engine.pipelines")]
    assert not bad


def test_training_imports_no_network_module():
    """The loop and its units ask a network for its post-step work (`after_optimizer_step`) instead of importing
    its family, and callers name the teacher-only keys; `import engine.training` loads no network either."""
    bad = [f"{m} imports {t} at line {lines[0]}" for m, targets in import_graph.imports().items()
           if m.startswith("engine.training") for t, lines in targets.items() if t.startswith("engine.networks")]
    assert not bad
    code = "import sys, engine.training; print(sorted(m for m in sys.modules if m.startswith('engine.networks')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_the_engine_folder_shows_its_architecture():
    """`ls engine/` is one screen: the flat math and entry points, and a subpackage per role."""
    tracked = subprocess.run(["git", "ls-files", "engine"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    entries = {p.split("/")[1] for p in tracked.stdout.split()}
    assert len(entries) <= 21, sorted(entries)
    assert set(import_graph.SUBPACKAGES) - {"kernels"} <= entries


def test_networks_do_not_import_data_parallelism():
    graph = import_graph.imports()
    bad = {m: sorted(t for t in targets if t.startswith(("torch.distributed", "engine.dist")))
           for m, targets in graph.items() if m.startswith("engine.networks")}
    assert not {m: t for m, t in bad.items() if t}


@pytest.mark.parametrize("module", ["engine.checkpoints.files", "engine.checkpoints.state_dicts", "engine.checkpoints.unpickler"])
def test_low_level_modules_import_no_network(module):
    code = (f"import sys, {module}; bad = sorted(m for m in sys.modules if m.startswith('engine.networks') or "
            "m in ('engine.precond', 'engine.dist', 'engine.checkpoints.registry', 'engine.training.loop')); "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_files_and_errors_are_leaves():
    """engine/errors.py imports nothing; engine/checkpoints/files.py only torch, the standard library and the
    error type."""
    graph = import_graph.imports()
    assert set(graph["engine.errors"]) == set()
    assert set(graph["engine.checkpoints.files"]) == {"engine.errors"}


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
    f = _function("engine/training/loop.py", "run_steps")
    assert f.end_lineno - f.lineno + 1 <= 80
    g = _function("engine/training/loop.py", "train_stage")
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
