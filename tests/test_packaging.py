"""The README's two commands are the project's interface: CI must run exactly the README's test command, and
both commands must pin torch before installing the project. The README stays short, its API example runs, every
`python -m` command the documentation names answers `--help`, the code passes the linter, and no import name we
install shadows anyone else's."""
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one():
    cmds = readme_commands()
    assert len(cmds) == 2, cmds
    main_job, tests = cmds
    for c in cmds:
        assert "pip install -q torch==2.13.0" in c and c.index("torch==2.13.0") < c.index("-e '.[test]'")
        # lpips only for its linear-head weights, and never with its dependencies (they pull a CUDA torch)
        assert "pip install -q --no-deps lpips==0.1.4" in c
    # the main job is the embedded-default recipe (digits: teacher → CMT → ECT against ECT)
    assert main_job.endswith("python recipes/digits_cmt_ect.py") and tests.endswith("python -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines()
    assert '"$rc" -eq 5' in ci  # pytest's "no tests collected" fails CI


def test_setup_installs_one_top_level_name_and_no_unpinned_cuda_pull():
    setup = (ROOT / "setup.py").read_text()
    assert 'find_packages(include=["engine", "engine.*"]) + ["engine.kernels"]' in setup
    assert 'package_dir={"engine.kernels": "kernels"}' in setup   # kernels/ installs under the engine's name
    assert re.search(r'"torch>=[\d.]+"', setup)  # a floor only: the README pins the exact wheel
    assert '"triton>=' in setup  # the kernel tests run in Triton's interpreter on CPU: they must not be skipped
    assert '"ruff' in setup      # the lint test below must not be skipped


@pytest.mark.parametrize("where", ["outside", "root"])
def test_importing_the_engine_beside_transformers_leaves_kernels_to_its_owner(tmp_path, where):
    """`import kernels` is never this project's package: ours installs as engine.kernels, and Hugging Face's
    `kernels` (which transformers imports) keeps its name, with the engine and transformers' CLIP imported in the
    same process — outside the repository, and from its root, where the checkout's folder hands the name over."""
    code = ("import engine.ops, engine.kernels, importlib.util\n"
            "import transformers\n"
            "from transformers import CLIPTextConfig, CLIPTextModel\n"
            "CLIPTextModel(CLIPTextConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1, "
            "num_attention_heads=2, max_position_embeddings=8))\n"
            "print(engine.kernels.__file__)\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print(spec.origin if spec else 'absent')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path if where == "outside" else ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ours, theirs = out.stdout.split()
    assert pathlib.Path(ours).resolve() == (ROOT / "kernels" / "__init__.py").resolve()
    assert theirs == "absent" or not pathlib.Path(theirs).resolve().is_relative_to(ROOT / "kernels")


def test_the_readme_is_short_and_in_the_promised_order():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 12 * 1024
    order = ["## The main job", "docs/digits_cmt_ect.png", "## Two commands", "## The API on one screen",
             "## Recipes", "## The folders", "## Documentation"]
    assert [text.index(s) for s in order] == sorted(text.index(s) for s in order)
    tree = re.search(r"## The folders\n\n```\n(.+?)\n```", text, flags=re.S).group(1)
    assert len(tree.splitlines()) <= 15


def test_the_readme_api_example_runs(tmp_path):
    """The one-screen example trains both stages and samples, as written."""
    example = re.search(r"```python\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.S).group(1)
    example += "\nassert samples.shape == (1000, 2) and bool(torch.isfinite(samples).all())\nprint('ok')\n"
    out = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
    assert (tmp_path / "runs" / "api" / "post_ect" / "ema.safetensors").exists()


def documented_commands() -> list[str]:
    docs = [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").glob("*.md"))
    found = set()
    for path in docs:
        found |= set(re.findall(r"-m (engine(?:\.\w+)+)", path.read_text()))
    return sorted(found)


def test_every_documented_python_m_command_answers_help():
    commands = documented_commands()
    assert {"engine.evaluate", "engine.training.phema", "engine.teacher.trajectory_cache"} <= set(commands)
    failed = {}
    for module in commands:
        out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        if out.returncode != 0 or "usage:" not in out.stdout:
            failed[module] = (out.stdout + out.stderr)[-500:]
    assert not failed, failed


def test_the_code_passes_the_linter():
    """`ruff check .` with pyproject.toml's configuration (pyflakes, pycodestyle at 120 columns)."""
    ruff = shutil.which("ruff", path=os.path.dirname(sys.executable)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]' installs it)")
    out = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]
