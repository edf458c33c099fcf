"""Test helper: the project's import graph, read from the source (every `import` statement, at module level or
inside a function, so that a deferred import cannot hide a cycle)."""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# folder → the package it installs as (setup.py: kernels/ is installed as engine.kernels)
PACKAGES = {"engine": "engine", "kernels": "engine.kernels"}
# the engine's subpackages: a folder of modules that counts as one node of the folder-level graph
SUBPACKAGES = ("checkpoints", "data", "kernels", "metrics", "networks", "objectives", "perceptual", "pipelines",
               "teacher", "training")


def modules() -> dict[str, str]:
    """{dotted module name: file path} of every Python module in the project's packages."""
    found = {}
    for folder, pkg in PACKAGES.items():
        for directory, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(directory, f), os.path.join(ROOT, folder))[:-3].split(os.sep)
                    rel = [r for r in rel if r != "."]
                    parts = pkg.split(".") + (rel[:-1] if rel[-1] == "__init__" else rel)
                    found[".".join(parts)] = os.path.join(directory, f)
    return found


def folder_of(module: str) -> str:
    """The node of the folder-level graph a module belongs to: its subpackage (engine.training), or the module
    itself for the flat modules of engine/ (engine.solvers)."""
    parts = module.split(".")
    if len(parts) >= 2 and parts[0] == "engine" and parts[1] in SUBPACKAGES:
        return ".".join(parts[:2])
    return module


def folder_imports() -> dict[str, dict[str, list[str]]]:
    """{folder node: {imported folder node: ["module imports module at line N", ...]}} without self-edges."""
    out: dict[str, dict[str, list[str]]] = {}
    for m, targets in imports().items():
        a = folder_of(m)
        out.setdefault(a, {})
        for t, lines in targets.items():
            if not t.startswith("engine"):
                continue
            b = folder_of(t)
            if b != a:
                out[a].setdefault(b, []).append(f"{m} imports {t} at line {lines[0]}")
    return out


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports() -> dict[str, dict[str, list[int]]]:
    """{module: {imported project module: [line numbers]}}; `from pkg import sub` counts as importing pkg.sub
    when sub is a module, else as importing pkg."""
    mods = modules()
    graph: dict[str, dict[str, list[int]]] = {m: {} for m in mods}
    for name, path in mods.items():
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        is_package = path.endswith("__init__.py")
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node, name, is_package)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                if t.split(".")[0] == "engine" or t.startswith("torch.distributed"):
                    graph[name].setdefault(t, []).append(node.lineno)
    return graph


def cycles(graph: dict[str, dict]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a module importing itself)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, {}):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out
