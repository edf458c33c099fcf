"""Flow matching, Mean Flow and CMT-MF (engine/objectives/meanflow.py) against direct float64 re-computations of
docs/spec/mf.md §1 and §4 on a small DiT: the Mean Flow target with a finite-difference du/dt, gradients through the
forward-AD attention op equal to those through explicit attention, and CMT-MF pairs from a stored trajectory."""
import math

import pytest
import torch
from devices import CUDA, INTERPRETED_ATTENTION

from engine import ops
from engine.kernels.jvp_attention import attention_reference
from engine.networks import DiT
from engine.objectives import CMTMeanFlow, FlowMatching, MeanFlow, StepRNG
from engine.objectives.meanflow import pair_indices
from engine.solvers import mean_flow_uniform


def net64(seed=0, classes=10):
    torch.manual_seed(seed)
    net = DiT(input_size=6, patch_size=2, in_channels=2, hidden_size=36, depth=2, num_heads=2,
              num_classes=classes).double()
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2 / math.sqrt(max(1, p.shape[-1])))
    return net


def data(B=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 10, (B,), generator=g)


@pytest.mark.parametrize("jvp", ["dual", "func"])
@pytest.mark.parametrize("guided", [False, True])
def test_mean_flow_loss_equals_direct_recomputation(guided, jvp):
    net = net64()
    x, y = data()
    obj = MeanFlow(omega=1.0 if not guided else 0.6, kappa=0.0 if not guided else 0.3, t_end=0.8,
                   label_dropout=0.25, jvp=jvp)
    out = obj(net, x, y, StepRNG.for_step(0, 0, 64))

    rng = StepRNG.for_step(0, 0, 64)   # the same draws in the same order
    B = 8
    a = torch.sigmoid(rng.randn([B], "cpu", torch.float64) * 1.0 - 0.4)
    b = torch.sigmoid(rng.randn([B], "cpu", torch.float64) * 1.0 - 0.4)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    r[:6] = t[:6]                                          # floor(0.75·8) rows with r = t
    eps = rng.randn(x.shape, "cpu", torch.float64)
    tv = t.reshape(-1, 1, 1, 1)
    z = (1 - tv) * x + tv * eps
    v = eps - x
    v_t = v.clone()
    with torch.no_grad():
        if guided:
            u_null = net(z, t, t, torch.full_like(y, 10))
            u_cond = net(z, t, t, y)
            g = 0.6 * v + 0.3 * u_cond + 0.1 * u_null
            v_t = torch.where((t <= 0.8).reshape(-1, 1, 1, 1), g, v)
        n_drop = int(torch.binomial(torch.tensor([8.0]), torch.tensor([0.25]), generator=rng.cpu).item())
        yy = y.clone()
        yy[:n_drop] = 10
        v_t[:n_drop] = v[:n_drop]
        h = 1e-6
        f = lambda zz, tt: net(zz, tt, r, yy)
        dudt = (f(z + h * v_t, t + h) - f(z - h * v_t, t - h)) / (2 * h)  # d/dt along (ṽ, r fixed, 1)
        u_tgt = v_t - (t - r).reshape(-1, 1, 1, 1) * dudt
        e = (net(z, t, r, yy) - u_tgt).square().reshape(B, -1).sum(1)
        ref = e / (e + 0.01)
    torch.testing.assert_close(out.loss.detach(), ref, rtol=1e-7, atol=1e-9)
    assert out.pairs == 8 and out.student_backward == 8
    assert out.student_forward == 8 + 2 + (16 if guided else 0)  # forward, JVP on the 2 r ≠ t rows, CFG passes


@pytest.mark.parametrize("jvp,kernels,device", [("dual", "auto", "cpu"),
                                                pytest.param("dual", "triton", "cpu", marks=INTERPRETED_ATTENTION),
                                                ("func", "auto", "cpu"),
                                                pytest.param("dual", "auto", "cuda", marks=CUDA.marks, id="dual-cuda"),
                                                pytest.param("func", "auto", "cuda", marks=CUDA.marks, id="func-cuda")])
def test_mean_flow_gradients_equal_the_explicit_attention_path(jvp, kernels, device, monkeypatch):
    """The loss's gradients with the extension's paths (dual-stream JVP with the C++ block, or with the Triton
    kernel: compiled on CUDA, in the interpreter on CPU; torch.func.jvp through the op's forward-AD rule) against
    torch.func.jvp through explicit math attention."""
    x, y = (t.to(device) for t in data())
    grads = []
    for reference in (False, True):
        net = net64().to(device)
        with monkeypatch.context() as m:
            if reference:
                m.setattr(ops, "attention", lambda q, k, v, scale=None: attention_reference(q, k, v, scale))
            else:
                m.setenv("ENGINE_KERNELS", kernels)
            obj = MeanFlow(omega=0.5, kappa=0.2, jvp="func" if reference else jvp)
            out = obj(net, x, y, StepRNG.for_step(1, 0, 0))
            out.loss.mean().backward()
        grads.append([p.grad.clone() for p in net.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    with pytest.raises(TypeError, match="dual-stream jvp"):
        MeanFlow(jvp="dual")(lambda z, t, r, labels: z, x, None, StepRNG.for_step(1, 0, 0))
    with pytest.raises(ValueError, match="jvp must be one of"):
        MeanFlow(jvp="double-backward")


def test_flow_matching_loss():
    net = net64()
    x, y = data()
    out = FlowMatching(label_dropout=0.0)(net, x, y, StepRNG.for_step(0, 0, 0))
    rng = StepRNG.for_step(0, 0, 0)
    t = torch.sigmoid(rng.randn([8], "cpu", torch.float64) - 0.4).reshape(-1, 1, 1, 1)
    eps = rng.randn(x.shape, "cpu", torch.float64)
    with torch.no_grad():
        ref = (net((1 - t) * x + t * eps, t.reshape(-1), t.reshape(-1), y) - (eps - x)).square().reshape(8, -1).sum(1)
    torch.testing.assert_close(out.loss.detach(), ref)


def test_pair_rules():
    counts = {rule: len(pair_indices(rule)) for rule in ("nonadjacent28", "all36", "drop_start28", "drop_end28")}
    assert counts == {"nonadjacent28": 28, "all36": 36, "drop_start28": 28, "drop_end28": 28}
    assert len(pair_indices("grid8", 7)) == 28
    assert (8, 0) in pair_indices("nonadjacent28") and (8, 7) not in pair_indices("nonadjacent28")
    assert all(i <= 7 for i, _ in pair_indices("drop_start28")) and all(j >= 1 for _, j in pair_indices("drop_end28"))
    with pytest.raises(ValueError, match="pair rule must be one of"):
        pair_indices("random")


@pytest.mark.parametrize("kind", ["mf", "fm"])
def test_cmt_mf_pairs_and_targets_from_the_stored_trajectory(kind):
    teacher = net64(seed=3).eval()
    student = net64(seed=4)
    obj = CMTMeanFlow(teacher, teacher_kind=kind, trajectories_per_batch=2, guidance=1.5 if kind == "fm" else None)
    x, y = data(2)
    seen = {}

    def spy(z, t, r, labels):
        seen.update(z=z, t=t, r=r, labels=labels)
        return student(z, t, r, labels)
    out = obj(spy, x, y, StepRNG.for_step(0, 0, 0))
    eps = StepRNG.for_step(0, 0, 0).randn(x.shape, "cpu", torch.float64)
    traj, nfe = obj.trajectory(eps, y)
    assert nfe == (8 if kind == "mf" else 2 * (2 * 8 - 1)) and out.teacher_nfe == 2 * nfe
    # the trajectory itself, step by step in float64
    z = eps.double()
    for k in range(8, 0, -1):
        t, s = k / 8, (k - 1) / 8
        T, S = torch.full((2,), t, dtype=torch.float64), torch.full((2,), s, dtype=torch.float64)
        if kind == "mf":
            z = z - (t - s) * teacher(z, T, S, y)
        else:
            vel = lambda zz, tt: (teacher(zz, tt, tt, torch.full_like(y, 10))
                                  + 1.5 * (teacher(zz, tt, tt, y) - teacher(zz, tt, tt, torch.full_like(y, 10))))
            d = vel(z, T)
            zp = z - (t - s) * d
            z = z - (t - s) * 0.5 * (d + vel(zp, S)) if k > 1 else zp
        torch.testing.assert_close(traj[k - 1], z, rtol=1e-12, atol=1e-12)
    # pairs: input z_{t_i} at (t_i, r = t_j), target (z_{t_i} − z_{t_j}) / (t_i − t_j), pair-major
    pairs = pair_indices("nonadjacent28")
    assert out.pairs == 56 and seen["z"].shape == (56, 2, 6, 6)
    for p, (i, j) in enumerate(pairs):
        for bb in range(2):
            e = p * 2 + bb
            assert torch.equal(seen["z"][e], traj[i][bb].to(seen["z"].dtype))
            assert seen["t"][e].item() == pytest.approx(i / 8) and seen["r"][e].item() == pytest.approx(j / 8)
            target = (traj[i][bb] - traj[j][bb]) / (i / 8 - j / 8)
            with torch.no_grad():
                loss = (student(seen["z"][e:e + 1], seen["t"][e:e + 1], seen["r"][e:e + 1], y[bb:bb + 1])
                        - target).square().sum()
            assert out.loss[e].item() == pytest.approx(loss.item(), rel=1e-5)
    with pytest.raises(ValueError, match="2 × 28 \\(nonadjacent28\\) = 56 pairs"):
        obj.images_per_step(64)


def test_cmt_mf_pair_subsets_per_trajectory():
    """pairs_per_trajectory = 5 of nonadjacent28: each trajectory trains on 5 distinct pairs of the rule, different
    trajectories on different subsets, with the same inputs and targets as the full construction."""
    teacher, student = net64(seed=3).eval(), net64(seed=4)
    obj = CMTMeanFlow(teacher, trajectories_per_batch=3, pairs_per_trajectory=5)
    assert obj.images_per_step(15) == 3
    x, y = data(3)
    seen = {}

    def spy(z, t, r, labels):
        seen.update(z=z, t=t, r=r)
        return student(z, t, r, labels)
    out = obj(spy, x, y, StepRNG.for_step(0, 0, 0))
    traj, _ = obj.trajectory(StepRNG.for_step(0, 0, 0).randn(x.shape, "cpu", torch.float64), y)
    rule = set(pair_indices("nonadjacent28"))
    chosen = []
    for bb in range(3):
        entries = [q * 3 + bb for q in range(5)]           # pair-major: entry q·m + b
        pairs = [(round(seen["t"][e].item() * 8), round(seen["r"][e].item() * 8)) for e in entries]
        assert len(set(pairs)) == 5 and set(pairs) <= rule
        for e, (i, j) in zip(entries, pairs):
            assert torch.equal(seen["z"][e], traj[i][bb])
            target = (traj[i][bb] - traj[j][bb]) / ((i - j) / 8)
            with torch.no_grad():
                ref = (student(seen["z"][e:e + 1], seen["t"][e:e + 1], seen["r"][e:e + 1], y[bb:bb + 1])
                       - target).square().sum()
            assert out.loss[e].item() == pytest.approx(ref.item(), rel=1e-9)
        chosen.append(frozenset(pairs))
    assert len(set(chosen)) > 1 and out.pairs == 15
    with pytest.raises(ValueError, match="pairs_per_trajectory must be in 1 … 28"):
        CMTMeanFlow(teacher, pairs_per_trajectory=29)


def test_mean_flow_sampling():
    net = net64().eval()
    eps = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    y = torch.tensor([1, 2, 3])
    one = mean_flow_uniform(net, eps, 1, y)
    with torch.no_grad():
        torch.testing.assert_close(one, eps - net(eps, torch.ones(3, dtype=torch.float64),
                                                  torch.zeros(3, dtype=torch.float64), y))
        two = mean_flow_uniform(net, eps, 2, y)
        h = torch.full((3,), 0.5, dtype=torch.float64)
        mid = eps - 0.5 * net(eps, torch.ones(3, dtype=torch.float64), h, y)
        torch.testing.assert_close(two, mid - 0.5 * net(mid, h, torch.zeros(3, dtype=torch.float64), y))
