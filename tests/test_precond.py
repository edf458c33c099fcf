"""Preconditioning: coefficients against docs/spec/cm.md §1.3's table, the eval-only boundary condition, σ and label
forms, and the float64 path."""
import math

import pytest
import torch
from torch import nn

from engine.precond import CMPrecond, EDMPrecond


class Probe(nn.Module):
    """Backbone stub: returns a fixed F and records what the wrapper passed in."""

    def __init__(self, value=None, label_dim=0):
        super().__init__()
        self.value, self.label_dim, self.calls = value, label_dim, []
        self.w = nn.Parameter(torch.tensor(0.3))

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        self.calls.append((x.clone(), noise_labels.clone(), None if class_labels is None else class_labels.clone()))
        if self.value is not None:
            return torch.full_like(x, self.value)
        return torch.tanh(x * self.w + noise_labels.reshape(-1, *([1] * (x.ndim - 1))))


def coefficients(net, sigma):
    """Extract (c_skip, c_out) from the wrapper: F ≡ 0 gives c_skip·x; x = 0 with F ≡ 1 gives c_out."""
    net.model.value = 0.0
    x = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    c_skip = net(x, sigma).item()
    net.model.value = 1.0
    c_out = net(torch.zeros_like(x), sigma).item()
    return c_skip, c_out


# docs/spec/cm.md §1.3, σ_d = 0.5, σ_min = 0.003: (σ, c_skip train, c_skip eval, c_out train, c_out eval)
SPEC_TABLE = [
    (80, 3.9061e-5, 3.9064e-5, 0.499990, 0.499971),
    (0.821, 0.270551, 0.271998, 0.427039, 0.425479),
    (0.77569, 0.293532, 0.295142, 0.420258, 0.418633),
    (0.1, 0.961538, 0.963729, 0.098058, 0.095116),
    (0.003, 0.999964, 1.0, 0.0030000, 0.0),
    (0.002, 0.999984, 0.999996, 0.0020000, -0.0010000),
]


@pytest.mark.parametrize("row", SPEC_TABLE, ids=lambda r: f"sigma={r[0]}")
def test_cm_coefficients_match_spec_table(row):
    sigma, skip_tr, skip_ev, out_tr, out_ev = row
    net = CMPrecond(Probe())
    assert net.sigma_min == 0.003
    net.train()
    cs, co = coefficients(net, sigma)
    assert cs == pytest.approx(skip_tr, rel=1e-4, abs=1e-6) and co == pytest.approx(out_tr, rel=1e-4, abs=1e-6)
    net.eval()
    cs, co = coefficients(net, sigma)
    assert cs == pytest.approx(skip_ev, rel=1e-4, abs=1e-6) and co == pytest.approx(out_ev, rel=1e-4, abs=1e-6)
    edm = EDMPrecond(Probe())
    assert coefficients(edm, sigma) == pytest.approx((skip_tr, out_tr), rel=1e-4, abs=1e-6)


def test_boundary_condition_holds_in_eval_mode_only():
    net = CMPrecond(Probe())
    x = torch.randn(4, 3, 8, 8)
    net.eval()
    assert torch.equal(net(x, 0.003), x)  # c_skip = 1, c_out = 0 exactly
    net.train()
    assert not torch.allclose(net(x, 0.003), x, atol=1e-4)  # EDM-parameterised while training
    # a train-mode student equals the EDM teacher with the same backbone (docs/spec/cm.md §1.3)
    teacher = EDMPrecond(net.model)
    s = torch.tensor([80.0, 1.0, 0.1, 0.003])
    torch.testing.assert_close(net(x, s), teacher(x, s), rtol=0, atol=0)


def test_input_side_and_noise_label():
    probe = Probe()
    net = EDMPrecond(probe)
    x = torch.randn(3, 2, 4, 4)
    s = torch.tensor([0.5, 2.0, 40.0])
    net(x, s)
    x_in, c_noise, labels = probe.calls[-1]
    torch.testing.assert_close(x_in, x / torch.sqrt(0.25 + s ** 2).reshape(-1, 1, 1, 1))
    torch.testing.assert_close(c_noise, torch.log(s) / 4)
    assert c_noise.shape == (3,) and labels is None


def test_sigma_forms_agree_and_bad_shapes_are_rejected():
    net = EDMPrecond(Probe())
    x = torch.randn(3, 2, 4, 4)
    ref = net(x, torch.full((3,), 0.7))
    for s in (0.7, torch.tensor(0.7), torch.full((3, 1, 1, 1), 0.7), torch.full((1,), 0.7)):
        torch.testing.assert_close(net(x, s), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="2 entries for a batch of 3"):
        net(x, torch.ones(2))
    with pytest.raises(ValueError, match="sigma must be a scalar"):
        net(x, torch.ones(3, 2))


def test_vector_data_and_float64_path():
    net = CMPrecond(Probe()).double().eval()
    x = torch.randn(5, 7, dtype=torch.float64)
    out = net(x, torch.rand(5, dtype=torch.float64) + 0.1)
    assert out.dtype == torch.float64 and out.shape == (5, 7)
    out32 = CMPrecond(Probe()).eval()(x.float(), 0.5)
    assert out32.dtype == torch.float32  # low-precision inputs compute in float32 like the reference


def test_labels():
    probe = Probe(label_dim=4)
    net = EDMPrecond(probe)
    x = torch.randn(3, 2)
    net(x, 1.0, torch.tensor([0, 3, 1]))
    torch.testing.assert_close(probe.calls[-1][2], torch.eye(4)[[0, 3, 1]])
    net(x, 1.0)  # no labels on a conditional net: zeros, as EDM does
    assert torch.equal(probe.calls[-1][2], torch.zeros(3, 4))
    net(x, 1.0, torch.eye(4)[[2, 2, 2]])
    torch.testing.assert_close(probe.calls[-1][2], torch.eye(4)[[2, 2, 2]])
    with pytest.raises(ValueError, match="out of range"):
        net(x, 1.0, torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError, match="one-hot"):
        net(x, 1.0, torch.ones(3, 5))
    # an unconditional backbone ignores labels whatever is passed (docs/spec/cm.md §1.2)
    probe0 = Probe()
    EDMPrecond(probe0)(x, 1.0, torch.tensor([1, 2, 3]))
    assert probe0.calls[-1][2] is None


def test_state_dict_keys_are_prefixed_model():
    net = CMPrecond(Probe())
    assert list(net.state_dict()) == ["model.w"]
    assert math.isinf(net.sigma_max) and net.sigma_data == 0.5
