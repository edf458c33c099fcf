"""The host allocator policy (engine/training/host_memory.py): under `retain` freed memory is reused without new page
faults,
under glibc's defaults it is faulted in again; training numbers do not depend on it. Each case runs in a fresh
process, since the policy is process-wide and glibc's untouched defaults cannot be restored once changed."""
import os
import subprocess
import sys

import pytest

from engine.training import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
glibc = pytest.mark.skipif(host_memory._glibc() is None, reason="the C library is not glibc")

FAULTS = """
import json, resource, sys, torch
from engine.training import host_memory
print(host_memory.apply(sys.argv[1]), file=sys.stderr)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2 ** 20
per, rss = [], []
for i in range(24):
    a = faults()
    x = torch.empty(48 * 2 ** 20 // 4)     # 48 MiB: above glibc's largest dynamic mmap threshold (32 MiB)
    x.fill_(1.0)                           # touch every page
    del x
    per.append(faults() - a)
    rss.append(rss_mib())
print(json.dumps(dict(faults=per[-8:], rss_growth_mib=rss[-1] - rss[-9])))
"""

TRAIN = """
import hashlib, sys, torch
from engine.training import host_memory
host_memory.apply(sys.argv[1])
from engine.training.loop import train_step
from engine.training.stage_config import StageConfig
from engine.networks.configs import build_network
from engine.networks.dropout import dropout_generator
from engine.objectives import ECT, StepRNG
from engine.training.optimizers import make_optimizer
from engine.precond import CMPrecond
torch.manual_seed(0)
net = CMPrecond(build_network("cifar10-ddpmpp", img_resolution=8, model_channels=16, channel_mult=[1, 2],
                              num_blocks=1, attn_resolutions=[4], dropout=0.2), sigma_data=0.5)
params = list(net.parameters())
opt = make_optimizer(StageConfig(name="t", total_kimg=1, batch_size=8, lr=1e-3), params, torch.device("cpu"))
x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
for k in range(3):
    train_step(net, ECT(q=2), opt, params, x, None, StepRNG.for_step(0, 0, 8 * k), torch.autocast("cpu", enabled=False),
               None, torch.device("cpu"))
h = hashlib.sha256()
for p in params:
    h.update(p.detach().numpy().tobytes())
print(h.hexdigest())
"""


def run(code: str, *args, env=None) -> str:
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT, **(env or {})}, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@glibc
def test_retain_reuses_freed_memory_without_faults():
    """A 48 MiB tensor allocated, touched and freed 24 times. Under glibc's defaults every round faults its 12288
    pages in again (a fresh mmap each time). Under `retain` the heap settles within a few rounds (glibc before 2.38
    cannot reuse a freed block for an aligned request of the same size until neighbouring blocks have merged) and
    then the last 8 rounds fault nothing and the resident size stops growing."""
    import json
    pages = 48 * 2 ** 20 // 4096
    system, retain = (json.loads(run(FAULTS, p)) for p in ("system", "retain"))
    assert min(system["faults"]) > 0.9 * pages
    assert max(retain["faults"]) < 0.02 * pages and abs(retain["rss_growth_mib"]) < 2


@glibc
def test_training_is_identical_under_either_policy():
    """Three ECT steps with dropout on a small DDPM++: the same parameters, bit for bit, in both processes."""
    assert run(TRAIN, "retain") == run(TRAIN, "system")


def test_policy_is_checked():
    with pytest.raises(ValueError, match="ENGINE_HOST_MEMORY"):
        host_memory.apply("jemalloc")
    out = subprocess.run([sys.executable, "-c", "from engine.training import host_memory; host_memory.apply()"], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT,
                                                              host_memory.ENV: "never"})
    assert out.returncode != 0 and "got 'never'" in out.stderr


def test_the_loop_and_the_benches_set_it():
    """The policy is process-wide, set where a stage starts and where the step benchmarks build a step."""
    import inspect

    from engine.training import loop
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import common
    assert "host_memory.apply()" in inspect.getsource(loop.train_stage)
    assert "host_memory.apply()" in inspect.getsource(common.StepBench.__init__)
