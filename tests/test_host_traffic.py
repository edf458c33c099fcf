"""No host traffic inside a training step after its first: every objective's step (forward, loss, backward, and
the clipping of gradients) runs with the networks and data on the meta device under a dispatch mode that records
each operation that moves host data to the device, mixes host and device tensors, or reads a device value on the
host (a synchronisation). On a GPU each of those is a pageable copy or a stall per step, and a CUDA graph cannot
capture them. The first step may build what later steps reuse (σ grids, solver plans and index tables on the
device); the second must record nothing (Slow CMT, an ablation, included). Host-side draws that stay on the host
(the step's CPU generator) are not traffic."""
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from engine.networks import DiT, build_network
from engine.networks.edm2_unet import EDM2UNet
from engine.objectives import CMT, ECD, ECT, SCT, CMTMeanFlow, LatentPosterior, MeanFlow, SlowCMT, squared_l2
from engine.objectives.base import StepRNG
from engine.precond import CMPrecond, EDM2Precond, EDMPrecond
from engine.training.loop import clip_gradients

META = torch.device("meta")


def _devices(tensors, ignore_host_scalars=True):
    return {t.device.type for t in tensors
            if not (ignore_host_scalars and t.device.type == "cpu" and t.dim() == 0)}


class HostTraffic(TorchDispatchMode):
    """Records host → device copies, ops that mix host and device tensors (a host 0-d tensor is a scalar and
    allowed), and device → host reads."""

    def __init__(self):
        super().__init__()
        self.events = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        target = kwargs.get("device")
        name = func.overloadpacket.__name__
        shapes = [(tuple(t.shape), t.device.type) for t in ins]
        if name in ("_local_scalar_dense", "nonzero", "is_nonzero") and _devices(ins) - {"cpu"}:
            self.events.append(f"device value read on the host: {func}")
        elif "cpu" in _devices(ins) and (_devices(ins) - {"cpu"} or
                                         (target is not None and torch.device(target).type != "cpu")):
            self.events.append(f"host tensor used on the device: {func} {shapes}")
        return func(*args, **kwargs)


class HostFactories(TorchFunctionMode):
    """Tensors made from host data straight onto a device (torch.tensor(list, device=...)): a copy that the
    dispatch mode does not see as one."""

    def __init__(self, events):
        super().__init__()
        self.events = events

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        data = args[0] if args else kwargs.get("data")
        on_host = not isinstance(data, torch.Tensor) or data.device.type == "cpu"
        if func in (torch.tensor, torch.as_tensor, torch.asarray) and on_host \
                and kwargs.get("device") is not None and torch.device(kwargs["device"]).type != "cpu":
            self.events.append(f"host data copied to the device: torch.{func.__name__}({type(data).__name__})")
        return func(*args, **kwargs)


def traffic_of_second_step(net, objective, images, labels):
    objective.to(META)
    params = [p for p in net.parameters() if p.requires_grad]
    events = []
    for step in range(2):
        rng = StepRNG(device=None, cpu=torch.Generator().manual_seed(step), rank=0, world=1)
        dispatch = HostTraffic()
        with HostFactories(dispatch.events), dispatch:
            out = objective(net, images, labels, rng)
            out.loss.float().mean().backward()
            clip_gradients(params, objective.parameters(), 1.0)
        events = dispatch.events
    return events


def mlp():
    return build_network("gmm-mlp", hidden_channels=16, num_blocks=1)


def dit():
    return DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10)


def edm2(logvar=None):
    return EDM2Precond(EDM2UNet(img_resolution=8, img_channels=4, label_dim=10, model_channels=16,
                                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]), logvar_channels=logvar)


def zeros(*shape):
    return torch.zeros(*shape, device=META)


CASES = {
    "cmt_edm_teacher": lambda: (CMPrecond(mlp()), CMT(EDMPrecond(mlp()).eval(), nfe=4, trajectories_per_batch=2,
                                                       distance=squared_l2), zeros(2, 2), None),
    "cmt_edm2_teacher": lambda: (edm2(), CMT(edm2(8).eval(), nfe=4, trajectories_per_batch=2, distance=squared_l2),
                                 zeros(2, 4, 8, 8), torch.zeros(2, dtype=torch.long, device=META)),
    "ect": lambda: (CMPrecond(mlp()), ECT(q=4), zeros(4, 2), None),
    "slow_cmt": lambda: (CMPrecond(mlp()), SlowCMT(EDMPrecond(mlp()).eval(), nfe=4, distance=squared_l2),
                         zeros(6, 2), None),
    "ecd": lambda: (CMPrecond(mlp()), ECD(EDMPrecond(mlp()).eval()), zeros(4, 2), None),
    "sct": lambda: (CMPrecond(mlp()), SCT(), zeros(4, 2), None),
    "mean_flow": lambda: (dit(), MeanFlow(), zeros(4, 4, 8, 8), torch.zeros(4, dtype=torch.long, device=META)),
    "cmt_mf": lambda: (dit(), CMTMeanFlow(dit().eval(), trajectories_per_batch=2, pairs_per_trajectory=3),
                       zeros(2, 4, 8, 8), torch.zeros(2, dtype=torch.long, device=META)),
    "latent_mean_flow": lambda: (dit(), LatentPosterior(MeanFlow(), convention="edm2"), zeros(4, 8, 8, 8),
                                 torch.zeros(4, dtype=torch.long, device=META)),
    "latent_cmt_edm2": lambda: (edm2(), LatentPosterior(CMT(edm2(8).eval(), nfe=4, trajectories_per_batch=2,
                                                            distance=squared_l2), convention="edm2"),
                                zeros(2, 8, 8, 8), torch.zeros(2, dtype=torch.long, device=META)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_training_step_after_the_first_moves_nothing_between_host_and_device(name):
    net, objective, images, labels = CASES[name]()
    for module in (net, *objective.frozen_networks()):
        module.to(META)
    events = traffic_of_second_step(net, objective, images, labels)
    assert not events, "\n".join(sorted(set(events)))


def test_the_detector_sees_each_kind_of_traffic():
    """The modes catch what they are for (a test that cannot fail is not a test)."""
    x = zeros(3)
    for traffic in (lambda: x + torch.ones(3),                      # a host tensor on the device
                    lambda: torch.arange(3).to(META),                # a copy
                    lambda: torch.tensor([1.0, 2.0], device=META)):  # host data straight to the device
        dispatch = HostTraffic()
        with HostFactories(dispatch.events), dispatch:
            try:
                traffic()
            except RuntimeError:   # the meta device refuses some mixes outright, after the mode saw them
                pass
        assert dispatch.events, traffic
    dispatch = HostTraffic()
    with HostFactories(dispatch.events), dispatch:
        x * torch.tensor(2.0)                                        # a host scalar is allowed
        torch.randn(3, generator=torch.Generator()).mul(2)          # host draws that stay on the host
    assert not dispatch.events
