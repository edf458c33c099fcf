"""The benchmark scripts run (on CPU, --smoke: tiny sizes, timings meaningless) and report every quantity their
tables need, so that a GPU session spends its time measuring, not debugging."""
import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_kernels_bench_smoke(tmp_path, capsys):
    res = load("kernels").main(["--smoke", "--out", str(tmp_path)])
    assert {r["dtype"] for r in res["update"]} == {"float32", "bfloat16"}
    for r in res["update"]:
        assert r["fused_us"] > 0 and r["copy_GBs"] > 0 and r["speedup_vs_eager"] > 0
    t = res["teacher"]
    assert t["graph_replays"] == 0  # CPU: the eager fallback (a GPU run replays)
    assert all(t[k] > 0 for k in ("eager_reference_ms", "eager_kernels_ms", "graph_ms", "cache_read_ms"))
    it = res["iterations"]
    for arm in ("cmt_eager_teacher", "cmt_graph_teacher", "cmt_cached"):
        assert it[f"{arm}/l2/over_ect"] > 0
    printed = capsys.readouterr().out
    assert "Fused DPM-Solver++ update" in printed and "| l2 |" in printed
    files = os.listdir(tmp_path)
    assert len(files) == 1 and json.load(open(tmp_path / files[0]))["command"] == "python bench/kernels.py --smoke"
