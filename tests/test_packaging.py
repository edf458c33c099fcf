"""The README's two commands are the project's interface: CI must run exactly the README's test command, and
both commands must pin torch before installing the project."""
import pathlib
import re

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


def test_setup_declares_both_packages_and_no_unpinned_cuda_pull():
    setup = (ROOT / "setup.py").read_text()
    assert '"engine", "engine.*", "kernels", "kernels.*"' in setup
    assert re.search(r'"torch>=[\d.]+"', setup)  # a floor only: the README pins the exact wheel
    assert '"triton>=' in setup  # the kernel tests run in Triton's interpreter on CPU: they must not be skipped
