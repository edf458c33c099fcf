"""A small float64 training stage for the distributed tests (tests/test_distributed.py), run as

    python tests/dist_harness.py --objective cmt|ect|mf|edm2|sct|scd --out DIR [--stop-at STEP] [--kill-at STEP]
    python -m torch.distributed.run --nproc_per_node=2 tests/dist_harness.py ...       (torchrun)

It trains 20 steps of 8 pairs (a checkpoint every 10 steps, a log record every step) on float64 synthetic data
with a tiny DDPM++ (CMT's teacher and student, ECT; sCT and sCD with their tangent warm-up and float64 adaptive
weight), a tiny Mean Flow DiT (guidance and label dropout on; `--jvp` picks either's JVP) or a tiny EDM2 U-Net
with EDM2's loss (forced weight normalisation, two tracked power EMAs snapshotted), and
writes final.pt (the consolidated network and EMA) on rank 0. --stop-at N leaves every rank after the checkpoint
of step N, as if the job ended there; --kill-at N SIGKILLs rank 1 at step N on the first attempt only (torchrun
--max-restarts then restarts the job, which resumes). float64 makes 1- and 2-process runs agree to ~1e-12, so the
tests can hold them to the issue's 1e-5 with a wide margin."""
import argparse
import json
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import dist  # noqa: E402
from engine.data.sampler import TensorSource  # noqa: E402
from engine.networks import DiT, EDM2UNet, SongUNet  # noqa: E402
from engine.objectives import CMT, ECT, SCD, SCT, EDM2Loss, MeanFlow, squared_l2  # noqa: E402
from engine.precond import CMPrecond, EDM2Precond, EDMPrecond  # noqa: E402
from engine.training.loop import train_stage  # noqa: E402
from engine.training.stage_config import StageConfig  # noqa: E402

BATCH, STEPS = 8, 20


def unet():
    return SongUNet(img_resolution=8, in_channels=1, out_channels=1, model_channels=8, channel_mult=[1, 2],
                    num_blocks=1, attn_resolutions=[4], dropout=0.0)


def build(objective: str, jvp: str = "default"):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if objective == "edm2":   # EDM2's U-Net and loss: forced weight normalisation of sharded weights, tracked EMAs
        net = EDM2Precond(EDM2UNet(img_resolution=8, img_channels=1, label_dim=4, model_channels=8, channel_mult=[1, 2],
                                   num_blocks=1, attn_resolutions=[4], channels_per_head=8, dropout=0.0))
        data = TensorSource(torch.randn(64, 1, 8, 8, generator=g, dtype=torch.float64),
                            torch.randint(0, 4, (64,), generator=g))
        return net.double(), EDM2Loss(P_mean=-0.8, P_std=1.6), data
    if objective == "mf":
        net = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=4)
        data = TensorSource(torch.randn(64, 1, 8, 8, generator=g, dtype=torch.float64),
                            torch.randint(0, 4, (64,), generator=g))
        return net.double(), MeanFlow(omega=0.6, kappa=0.2, label_dropout=0.25,
                                      jvp="auto" if jvp == "default" else jvp), data
    data = TensorSource(torch.rand(64, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1)
    if objective in ("sct", "scd"):
        # the tangent warm-up changes r_w every step (set_progress); w_φ in float64 like the network
        kw = dict(warmup_kimg=0.08, jvp="func" if jvp == "default" else jvp)
        obj = SCT(**kw) if objective == "sct" else \
            SCD(EDMPrecond(unet()).double().eval().requires_grad_(False), **kw)
        obj.weight.double()
        return CMPrecond(unet()).double(), obj, data
    if objective == "cmt":
        teacher = EDMPrecond(unet()).double().eval().requires_grad_(False)
        return CMPrecond(unet()).double(), CMT(teacher, nfe=4, trajectories_per_batch=2, distance=squared_l2,
                                               graphs=False), data
    return CMPrecond(unet()).double(), ECT(q=4), data


class Interrupt:
    """The objective, with the test's interruptions at the start of a step (after the previous checkpoint). They
    are private attributes: the test's instrumentation is not part of what the stage is (its identity)."""

    def __init__(self, inner, stop_at: int | None, kill_at: int | None, signal_at: int | None = None):
        self.inner, self._stop_at, self._kill_at, self._signal_at = inner, stop_at, kill_at, signal_at

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args):
        return self.inner(*args)

    def set_progress(self, nimg: int) -> None:
        step = nimg // BATCH
        if self._stop_at is not None and step == self._stop_at:
            os._exit(0)  # every rank leaves here, after the checkpoint of step stop_at
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if self._kill_at is not None and step == self._kill_at and dist.rank() == 1 and first_attempt:
            os.kill(os.getpid(), signal.SIGKILL)
        if self._signal_at is not None and step == self._signal_at and dist.rank() == 1:
            os.kill(os.getpid(), signal.SIGTERM)   # one rank only: the others must learn it and stop with it
        self.inner.set_progress(nimg)


def count_reductions() -> dict:
    """Make every DDP wrapper the loop builds count its gradient all-reduces (buckets reduced, total elements)."""
    counts = dict(buckets=0, elements=0)
    wrap = dist.wrap

    def counted(net, strategy, device, bf16=True):
        model = wrap(net, strategy, device, bf16)
        if type(model).__name__ == "DistributedDataParallel":
            def hook(state, bucket):
                counts["buckets"] += 1
                counts["elements"] += bucket.buffer().numel()
                buf = bucket.buffer().div_(dist.world_size())
                return torch.distributed.all_reduce(buf, async_op=True).get_future().then(lambda f: f.value()[0])
            model.register_comm_hook(None, hook)
        return model
    dist.wrap = counted
    return counts


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--objective", choices=["cmt", "ect", "mf", "edm2", "sct", "scd"], required=True)
    p.add_argument("--jvp", default="default",
                   help="the JVP of sCT / sCD ('func' by default, or 'fd') and of Mean Flow ('auto' by default, "
                        "'dual', 'func' or 'fd')")
    p.add_argument("--out", required=True)
    p.add_argument("--parallel", default="auto")
    p.add_argument("--stop-at", type=int, default=None)
    p.add_argument("--kill-at", type=int, default=None)
    p.add_argument("--sigterm-at", type=int, default=None, help="SIGTERM rank 1 at the start of that step")
    p.add_argument("--shard-teacher", action="store_true")
    p.add_argument("--count-reductions", action="store_true",
                   help="under DDP: count the gradient all-reduces (a comm hook on every bucket) into reductions.json")
    p.add_argument("--one-process-group", action="store_true",
                   help="without torchrun: join a process group of this one process (NCCL on CUDA, else gloo), so "
                        "that --parallel fsdp shards at world size 1")
    a = p.parse_args()
    if a.one_process_group:
        import torch.distributed as td
        os.makedirs(a.out, exist_ok=True)
        td.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1,
                              init_method="file://" + os.path.join(os.path.abspath(a.out), "process-group"))
    device = dist.init()
    reductions = count_reductions() if a.count_reductions else None
    net, objective, data = build(a.objective, a.jvp)
    if reductions is not None:
        reductions["trained_elements"] = sum(p.numel() for p in net.parameters() if p.requires_grad)
    cfg = StageConfig(name="stage", total_kimg=STEPS * BATCH / 1000, batch_size=BATCH, lr=1e-3, optimizer="adam",
                      lr_schedule="constant", ema_beta=0.9, log_kimg=0.001, ckpt_kimg=10 * BATCH / 1000,
                      parallel=a.parallel, keep_checkpoints=10, shard_teacher=a.shard_teacher,
                      snapshot_emas=(0.05, 0.1) if a.objective == "edm2" else (), snapshot_kimg=5 * BATCH / 1000)
    res = train_stage(cfg, net.to(device), Interrupt(objective, a.stop_at, a.kill_at, a.sigterm_at), data, a.out, device)
    if dist.rank() == 0:
        torch.save(dict(net=res.net.state_dict(), ema=res.ema.state_dict()), os.path.join(a.out, "final.pt"))
        if reductions is not None:
            with open(os.path.join(a.out, "reductions.json"), "w") as f:
                json.dump(reductions, f)
    dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main()
