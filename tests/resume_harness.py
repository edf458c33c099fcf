"""A short two-stage Gaussian-mixture run (CMT → ECT) that can SIGKILL itself at a chosen point, for the resume
test. Usage: python resume_harness.py OUT [--kill-at-call N] [--kill-in-save K]

--kill-at-call N: SIGKILL inside the N-th objective call (mid-step, after the forward has started).
--kill-in-save K: SIGKILL in the middle of writing the K-th checkpoint (half the bytes written).
--signal-at-call N --signal TERM|INT: send that signal inside the N-th objective call (what a scheduler or Ctrl-C
does); the loop is expected to save at the step boundary and exit with 128 + the signal's number.
At the end the final stage's student and EMA weights are saved to OUT/final.pt."""
import argparse
import os
import signal

import torch

from engine.data import GaussianMixture
from engine.data.sampler import TensorSource
from engine.networks import build_network
from engine.objectives import CMT, ECT, squared_l2
from engine.precond import CMPrecond
from engine.training.loop import initialise, train_stage
from engine.training.stage_config import StageConfig


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--kill-at-call", type=int, default=0)
    ap.add_argument("--kill-in-save", type=int, default=0)
    ap.add_argument("--signal-at-call", type=int, default=0)
    ap.add_argument("--signal", choices=["TERM", "INT"], default="TERM")
    a = ap.parse_args()
    torch.set_num_threads(1)
    calls = {"objective": 0, "save": 0}

    if a.kill_in_save:
        real_save = torch.save

        def dying_save(obj, f, *args, **kw):
            calls["save"] += 1
            if calls["save"] == a.kill_in_save:
                import io
                buf = io.BytesIO()
                real_save(obj, buf, *args, **kw)
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kw)

        torch.save = dying_save

    class Killing:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, net, images, labels, rng):
            calls["objective"] += 1
            out = self.inner(net, images, labels, rng)
            if calls["objective"] == a.kill_at_call:
                os.kill(os.getpid(), signal.SIGKILL)
            if calls["objective"] == a.signal_at_call:
                os.kill(os.getpid(), getattr(signal, f"SIG{a.signal}"))
            return out

    gm = GaussianMixture.random(4, (2,), std=0.1, seed=0)
    data = TensorSource(gm.sample(512, generator=torch.Generator().manual_seed(0)).float())
    torch.manual_seed(0)
    make = lambda: CMPrecond(build_network("gmm-mlp", hidden_channels=32, num_blocks=2, dropout=0.1))
    init = make().state_dict()
    cfg = dict(batch_size=32, lr=1e-3, log_kimg=0.064, ckpt_kimg=0.096, keep_checkpoints=2, seed=5)
    mid = train_stage(StageConfig(name="mid", total_kimg=0.384, **cfg), initialise(make(), init),
                      Killing(CMT(gm, nfe=8, trajectories_per_batch=4, distance=squared_l2)), data, a.out)
    post = train_stage(StageConfig(name="post", total_kimg=0.384, ema_beta=0.99, **{**cfg, "lr": 5e-4}),
                       initialise(make(), mid.ema), Killing(ECT(q=64)), data, a.out)
    torch.save({"net": post.net.state_dict(), "ema": post.ema.state_dict(), "counters": post.counters},
               os.path.join(a.out, "final.pt"))


if __name__ == "__main__":
    main()
