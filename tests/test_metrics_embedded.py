"""Metrics of the embedded runs against independent references: scipy's sqrtm and closed forms for the Fréchet
distance, closed-form 1-D Wasserstein distances, the exact PF-ODE flow of the Gaussian mixture, and the
digits classifier's accuracy, cache behaviour and separation of real from degraded images."""
import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from engine.data import GaussianMixture, digits
from engine.metrics import (DigitsClassifierConfig, DigitsMetrics, FeatureStatistics, class_histogram,
                            default_cache_dir, digits_classifier_path, feature_statistics, flow_map_error,
                            frechet_distance, load_digits_classifier, reference_ode_steps, sliced_wasserstein,
                            to_classifier_input, wasserstein_1d_squared)
from engine.schedules import logsnr_sigmas
from engine.solvers import dpm_solver_pp, pf_ode_reference


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: with two threads on two shared cores, other load slows each op ~50×."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- Fréchet distance -----------------------------------------------------------------------------------------

def fd_scipy(mu1, s1, mu2, s2):
    """The reference code's formula (docs/spec/cm.md §7.1): real part of scipy's sqrtm of the product."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def random_features(n, d, rank=None, seed=0, shift=0.0):
    rng = np.random.default_rng(seed)
    rank = d if rank is None else rank
    mix = rng.normal(size=(rank, d)) / math.sqrt(rank)
    return rng.normal(size=(n, rank)) @ mix + shift + rng.normal(size=d)


def test_frechet_matches_scipy_full_rank():
    f1, f2 = random_features(600, 24, seed=0), random_features(400, 24, seed=1, shift=0.3)
    mu1, s1 = feature_statistics(f1)
    mu2, s2 = feature_statistics(f2)
    ours = frechet_distance(mu1, s1, mu2, s2)
    np.testing.assert_allclose(ours, fd_scipy(mu1, s1, mu2, s2), rtol=1e-9)
    # tensors in any float dtype are accepted and computed in float64
    t = [torch.from_numpy(a) for a in (mu1, s1, mu2, s2)]
    assert frechet_distance(*t) == ours
    assert frechet_distance(t[0].float(), t[1], t[2], t[3]) == pytest.approx(ours, rel=1e-6)


def test_frechet_rank_deficient():
    """Features of rank 5 in 32 dimensions (fewer directions than dimensions, as with dead ReLU units)."""
    rng = np.random.default_rng(3)
    basis = np.linalg.qr(rng.normal(size=(32, 5)))[0]                    # orthonormal [32, 5]
    z1, z2 = rng.normal(size=(300, 5)), 1.5 * rng.normal(size=(200, 5)) + 0.2
    mu1, s1 = feature_statistics(z1 @ basis.T)
    mu2, s2 = feature_statistics(z2 @ basis.T)
    assert np.linalg.matrix_rank(s1) == 5
    # Exact oracle: both live in span(basis), where the covariances are full rank and FD is basis-invariant.
    exact = fd_scipy(*feature_statistics(z1), *feature_statistics(z2))
    ours = frechet_distance(mu1, s1, mu2, s2)
    np.testing.assert_allclose(ours, exact, rtol=1e-8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                                  # sqrtm may warn on a singular product
        np.testing.assert_allclose(ours, fd_scipy(mu1, s1, mu2, s2), rtol=1e-4)
    # Different column spaces (the product is singular and non-normal): still agrees with scipy, never NaN.
    mu3, s3 = feature_statistics(random_features(300, 32, rank=7, seed=4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = fd_scipy(mu1, s1, mu3, s3)
    np.testing.assert_allclose(frechet_distance(mu1, s1, mu3, s3), ref, rtol=1e-4)


def test_frechet_of_few_samples_equals_the_full_eigendecomposition():
    """10 samples in 64 dimensions (rank 9, as a few samples of 2,048 Inception features) against 500: the
    factored path equals the trace computed from the samples' own 9 principal directions (Σ = B Bᵀ from the SVD
    of the centred features, tr (Σ₁^½ Σ₂ Σ₁^½)^½ = Σ √eig(Bᵀ Σ₂ B)) in either argument order, and a full-rank pair
    (both covariances factored) equals D × D eigendecompositions, in float64."""
    def by_eigh(mu1, s1, mu2, s2):
        w, v = np.linalg.eigh(s1)
        root = (v * np.sqrt(w)) @ v.T
        ev = np.linalg.eigvalsh(root @ s2 @ root)
        return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(ev).sum())
    f = random_features(10, 64, seed=11, shift=0.5)
    few, many = feature_statistics(f), feature_statistics(random_features(500, 64, seed=12))
    _, sv, vt = np.linalg.svd(f - f.mean(0), full_matrices=False)
    b = vt[:9].T * (sv[:9] / 3.0)                                        # Σ_few = B Bᵀ (N − 1 = 9)
    np.testing.assert_allclose(b @ b.T, few[1], rtol=0, atol=1e-12)
    tr = np.sqrt(np.linalg.eigvalsh(b.T @ many[1] @ b)).sum()
    diff = few[0] - many[0]
    exact = diff @ diff + np.trace(few[1]) + np.trace(many[1]) - 2 * tr
    np.testing.assert_allclose(frechet_distance(*few, *many), exact, rtol=1e-12)
    np.testing.assert_allclose(frechet_distance(*many, *few), exact, rtol=1e-12)
    other = feature_statistics(random_features(300, 64, seed=13))
    np.testing.assert_allclose(frechet_distance(*many, *other), by_eigh(*many, *other), rtol=1e-10)


def test_frechet_zero_for_identical_and_order_invariant():
    f = random_features(500, 16, seed=5, shift=10.0)
    mu, s = feature_statistics(f)
    assert frechet_distance(mu, s, mu, s) < 1e-10 * np.trace(s)
    mu_p, s_p = feature_statistics(f[np.random.default_rng(0).permutation(len(f))])
    np.testing.assert_allclose(mu_p, mu, rtol=0, atol=1e-12)
    np.testing.assert_allclose(s_p, s, rtol=0, atol=1e-12)
    g = random_features(300, 16, seed=6, shift=10.2)
    fd = frechet_distance(mu, s, *feature_statistics(g))
    assert frechet_distance(mu_p, s_p, *feature_statistics(g[::-1])) == pytest.approx(fd, rel=1e-10)
    assert frechet_distance(*feature_statistics(g), mu, s) == pytest.approx(fd, rel=1e-8)   # symmetric


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(7)
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    a, b = rng.uniform(0.1, 3, size=10), rng.uniform(0.1, 3, size=10)
    a[:3] = 0.0                                                          # singular directions included
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_feature_statistics_conventions_and_streaming():
    f = random_features(257, 12, seed=8, shift=1e6)                     # large mean: no cancellation
    mu, s = feature_statistics(f)
    np.testing.assert_allclose(mu, f.mean(0), rtol=1e-14)
    np.testing.assert_allclose(s, np.cov(f, rowvar=False), rtol=1e-9, atol=1e-12)
    _, s_b = feature_statistics(torch.from_numpy(f), unbiased=False)
    np.testing.assert_allclose(s_b, np.cov(f, rowvar=False, bias=True), rtol=1e-9, atol=1e-12)
    acc = FeatureStatistics(12)
    for chunk in np.array_split(f, [1, 50, 51, 200]):                    # odd batch sizes, an empty one too
        acc.update(chunk)
        acc.update(chunk[:0])
    assert acc.num == 257
    mu_s, s_s = acc.mu_sigma()
    np.testing.assert_allclose(mu_s, mu, rtol=1e-15)
    np.testing.assert_allclose(s_s, s, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"\[N, 12\]"):
        acc.update(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="non-finite"):
        feature_statistics(np.full((3, 2), np.nan))
    with pytest.raises(ValueError, match="match the means"):
        frechet_distance(mu, s, mu, s[:5, :5])


# ---- sliced Wasserstein ----------------------------------------------------------------------------------------

def test_sliced_wasserstein_identical_symmetric_and_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(700, 3, 4, generator=g)
    y = torch.randn(450, 3, 4, generator=g) + 0.5
    assert sliced_wasserstein(x, x) == 0.0
    assert sliced_wasserstein(x, y) == sliced_wasserstein(y, x)
    # 1-D: one direction, no Monte-Carlo error; a translated copy is at exactly |shift|.
    x1 = torch.randn(1000, generator=g, dtype=torch.float64)
    assert sliced_wasserstein(x1, x1 - 0.7) == pytest.approx(0.7, abs=1e-12)
    assert sliced_wasserstein(x1[:, None], x1[:, None] + 0.7) == pytest.approx(0.7, abs=1e-12)
    # …and fresh samples of the translated law, up to sampling error.
    y1 = torch.randn(40000, generator=g, dtype=torch.float64) + 0.7
    x1 = torch.randn(40000, generator=g, dtype=torch.float64)
    assert sliced_wasserstein(x1, y1) == pytest.approx(0.7, abs=0.03)
    # D dimensions: SW₂² = E(θ·v)² = ‖v‖²/D for a translation v (Monte-Carlo over θ only).
    v = torch.tensor([3.0, -1.0, 0.5, 2.0, 0.0, 1.0], dtype=torch.float64)
    xd = torch.randn(500, 6, generator=g, dtype=torch.float64)
    sw2 = sliced_wasserstein(xd, xd + v, num_projections=4000, generator=torch.Generator().manual_seed(1),
                             squared=True)
    assert sw2 == pytest.approx(float(v.square().sum()) / 6, rel=0.06)
    # Fixed default directions: repeated calls agree.
    assert sliced_wasserstein(x, y) == sliced_wasserstein(x, y)


def test_wasserstein_1d_gaussians_closed_form_unequal_sizes():
    """W₂² = (μ₁ − μ₂)² + (s₁ − s₂)² for 1-D Gaussians; sizes differ, so the common quantile grid is used."""
    g = torch.Generator().manual_seed(2)
    x = 0.5 + 1.0 * torch.randn(120000, generator=g, dtype=torch.float64)
    y = -1.0 + 2.0 * torch.randn(70001, generator=g, dtype=torch.float64)
    expected = 1.5 ** 2 + 1.0 ** 2
    assert sliced_wasserstein(x, y, squared=True) == pytest.approx(expected, rel=0.02)


def test_wasserstein_1d_exact_on_unequal_sizes():
    """Oracle: repeating each set to the common size lcm(N, M) leaves the distribution unchanged and makes
    W₂² the mean squared difference of sorted values."""
    g = torch.Generator().manual_seed(3)
    for n, m in [(6, 4), (7, 5), (1, 9), (12, 12)]:
        a = torch.randn(n, 3, generator=g, dtype=torch.float64)
        b = torch.randn(m, 3, generator=g, dtype=torch.float64) * 2
        L = math.lcm(n, m)
        oracle = (a.repeat_interleave(L // n, 0).sort(0)[0] - b.repeat_interleave(L // m, 0).sort(0)[0]
                  ).square().mean(0)
        torch.testing.assert_close(wasserstein_1d_squared(a, b), oracle, rtol=1e-12, atol=1e-14)
    y = torch.randn(33, 5, generator=g)
    x = torch.randn(20, 5, generator=g)
    assert sliced_wasserstein(x, torch.cat([y, y])) == pytest.approx(sliced_wasserstein(x, y), rel=1e-12)
    with pytest.raises(ValueError, match="event size"):
        sliced_wasserstein(x, y[:, :3])


# ---- flow-map error --------------------------------------------------------------------------------------------

SIGMAS = [80.0, 2.0, 0.3, 0.02]


@pytest.fixture(scope="module")
def gm():
    return GaussianMixture.random(6, (3,), std=0.08, seed=2, num_classes=3)


def rk4_flow(gm, steps_per_unit=96, sigma_end=0.002):
    def f(x, sigma, labels=None):
        s = float(sigma[0])
        return pf_ode_reference(gm, x, s, sigma_end, reference_ode_steps(s, sigma_end, steps_per_unit), labels)
    return f


def dpm_flow(gm, nfe, sigma_end=0.002):
    def f(x, sigma, labels=None):
        return dpm_solver_pp(gm, x, logsnr_sigmas(nfe, float(sigma[0]), sigma_end), labels=labels)[-1]
    return f


def test_flow_map_error_of_exact_flow_is_zero(gm):
    # The reference's own integrator (same steps) is bit-identical: exactly 0.
    r = flow_map_error(rk4_flow(gm, steps_per_unit=64), gm, [2.0], 64, torch.Generator().manual_seed(0),
                       dtype=torch.float64)
    assert r.mean == 0.0
    # A finer RK4 solve: the difference is the reference's O(h⁴) error, far below float32 rounding.
    r = flow_map_error(rk4_flow(gm), gm, SIGMAS, 64, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert r.per_sigma.shape == (4,) and r.mean == pytest.approx(float(r.per_sigma.mean()))
    assert r.per_sigma.max() < 1e-15, r.per_sigma
    # A float32 student sees the rounded state; the reference starts from the same point, so still ~0.
    r32 = flow_map_error(rk4_flow(gm), gm, SIGMAS[:1], 64, torch.Generator().manual_seed(0))
    assert r32.per_sigma.max() < 1e-15
    # Conditional flows: the exact conditional flow is ~0, the unconditional one is not.
    r_c = flow_map_error(rk4_flow(gm), gm, [0.3], 128, torch.Generator().manual_seed(0), conditional=True,
                         dtype=torch.float64)
    assert r_c.mean < 1e-15

    def uncond(x, sigma, labels=None):
        assert labels is not None and labels.dtype == torch.long
        return rk4_flow(gm)(x, sigma)
    assert flow_map_error(uncond, gm, [0.3], 128, torch.Generator().manual_seed(0), conditional=True,
                          dtype=torch.float64).mean > 1e-3


def test_flow_map_error_decreases_with_solver_accuracy(gm):
    errs = [flow_map_error(dpm_flow(gm, nfe), gm, SIGMAS[:2], 128, torch.Generator().manual_seed(1),
                           dtype=torch.float64, batch_size=50).mean for nfe in (4, 8, 16, 32)]
    assert all(e > 0 for e in errs)
    assert all(b < 0.5 * a for a, b in zip(errs[:-1], errs[1:])), errs


def test_flow_map_error_of_identity_computed_directly(gm):
    n, g = 128, torch.Generator().manual_seed(2)
    r = flow_map_error(lambda x, sigma, labels=None: x, gm, SIGMAS, n, g, dtype=torch.float64, sigma_end=0.003)
    g = torch.Generator().manual_seed(2)                               # the documented draw order
    y = gm.sample(n, generator=g)
    eps = torch.randn(y.shape, generator=g, dtype=torch.float64)
    for s, got, se in zip(SIGMAS, r.per_sigma, r.stderr):
        x = y + s * eps
        sq = (x - pf_ode_reference(gm, x, s, 0.003, steps=600)).square().sum(1)
        assert float(got) == pytest.approx(float(sq.mean()), rel=1e-7)
        assert float(se) == pytest.approx(float(sq.std() / math.sqrt(n)), rel=1e-6)
    # At σ = σ_end the flow is the identity.
    assert flow_map_error(lambda x, sigma, labels=None: x, gm, [0.003], 8, sigma_end=0.003).mean == 0.0


def test_flow_map_error_argument_checks(gm):
    net = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match="training mode"):
        flow_map_error(net, gm, [1.0], 8)
    with pytest.raises(ValueError, match="sigma_end"):
        flow_map_error(lambda x, s, labels=None: x, gm, [0.001], 8)
    with pytest.raises(ValueError, match="component classes"):
        flow_map_error(lambda x, s, labels=None: x, GaussianMixture.random(2, (3,)), [1.0], 8, conditional=True)


# ---- digits classifier ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_metrics(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    m = DigitsMetrics(cache_dir=cache)
    return m, cache


def test_digits_classifier_accuracy_and_cache(digits_metrics, monkeypatch):
    m, cache = digits_metrics
    assert not m.info["loaded_from_cache"]
    assert m.test_accuracy >= 0.95, m.test_accuracy
    path = digits_classifier_path(cache)
    assert path.is_file() and path.name.startswith("digits_classifier-")
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]    # atomic write left nothing behind
    x_test, _ = digits(8, split="test")
    again = DigitsMetrics(cache_dir=cache)
    assert again.info["loaded_from_cache"] and again.test_accuracy == m.test_accuracy
    assert torch.equal(again.predict(x_test), m.predict(x_test))
    assert torch.equal(again.features(x_test), m.features(x_test))
    np.testing.assert_array_equal(again.ref_sigma, m.ref_sigma)
    # The cache directory comes from ENGINE_CACHE_DIR when no argument names one.
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(cache))
    assert default_cache_dir() == cache and digits_classifier_path() == path
    assert DigitsMetrics().info["loaded_from_cache"]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_content"])
def test_digits_classifier_corrupt_cache_is_retrained(tmp_path, damage):
    config = DigitsClassifierConfig(epochs=1)                            # quick: only the cache logic is tested
    _, info = load_digits_classifier(tmp_path, config)
    path = digits_classifier_path(tmp_path, config)
    good = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not a checkpoint")
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    else:
        torch.save({"model": {}}, path)
    with pytest.warns(RuntimeWarning, match="retraining"):
        model, info2 = load_digits_classifier(tmp_path, config)
    assert not info2["loaded_from_cache"]
    x = digits(8, split="test")[0][:50]
    _, info3 = load_digits_classifier(tmp_path, config)
    assert info3["loaded_from_cache"]
    # Deterministic training: the retrained weights are the original ones.
    assert info2["test_accuracy"] == info["test_accuracy"]
    assert torch.equal(torch.as_tensor(info3["ref_mu"]), torch.as_tensor(info["ref_mu"]))
    assert model(x).shape == (50, 10)


def test_digits_classifier_advances_the_global_rng_alike_cold_warm_or_corrupt(tmp_path):
    """A recipe seeds, builds DigitsMetrics, then initialises its network from the global RNG: the classifier's
    cache state must not move that RNG differently (a cold cache once gave a rerun other initial weights, so the
    rerun refused to resume its own run)."""
    config = DigitsClassifierConfig(epochs=1)

    def state_after(retrain=False):
        torch.manual_seed(7)
        _, info = load_digits_classifier(tmp_path, config, retrain)
        return torch.random.get_rng_state(), info["loaded_from_cache"]
    cold, warm, forced = state_after(), state_after(), state_after(retrain=True)
    digits_classifier_path(tmp_path, config).write_bytes(b"not a checkpoint")
    with pytest.warns(RuntimeWarning, match="retraining"):
        corrupt = state_after()
    assert [c[1] for c in (cold, warm, forced, corrupt)] == [False, True, False, False]
    assert all(torch.equal(cold[0], other[0]) for other in (warm, forced, corrupt))
    torch.manual_seed(7)
    assert not torch.equal(cold[0], torch.random.get_rng_state())   # it does advance: by one construction


def test_digits_fd_separates_real_from_degraded(digits_metrics):
    m, _ = digits_metrics
    x_test, _ = digits(8, split="test")
    train_stats = m.statistics(digits(8, split="train")[0])
    fd_real = m.frechet_distance(x_test, reference=train_stats)
    g = torch.Generator().manual_seed(0)
    fd_noise = m.frechet_distance(torch.rand(500, 1, 8, 8, generator=g) * 2 - 1, reference=train_stats)
    fd_gray = m.frechet_distance(0.02 * torch.randn(500, 1, 8, 8, generator=g), reference=train_stats)
    blurred = F.avg_pool2d(F.pad(x_test, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    fd_blur = m.frechet_distance(blurred, reference=train_stats)
    assert fd_real < fd_blur / 20 and fd_real < fd_noise / 20 and fd_real < fd_gray / 20, \
        (fd_real, fd_blur, fd_noise, fd_gray)
    # the recipes' floor is exactly this held-out measurement, and `against_training` the same reference
    assert m.heldout_floor() == dict(fd=pytest.approx(fd_real, rel=1e-12), n=359)
    assert m.against_training(blurred) == pytest.approx(fd_blur, rel=1e-12)
    # The cached reference is all 1797 images; the whole set scores 0 against it.
    assert m.frechet_distance(digits(8)[0]) < 1e-6
    # Resolution: nearest-upsampled digits average-pool back to the source exactly.
    assert m.frechet_distance(digits(32, split="test")[0]) == pytest.approx(m.frechet_distance(x_test), rel=1e-9)
    with pytest.raises(ValueError, match="multiple of 8"):
        to_classifier_input(torch.zeros(4, 1, 12, 12))
    with pytest.raises(ValueError, match=r"\[N, 1, R, R\]"):
        to_classifier_input(torch.zeros(4, 3, 8, 8))


def test_digits_class_histogram(digits_metrics):
    m, _ = digits_metrics
    x, labels = digits(16)
    out = m(x)
    assert out["fd"] < 1e-6 and sum(out["counts"]) == len(labels)
    assert out["tv_uniform"] < 0.03 and out["kl_uniform"] < 0.01 and out["tv_data"] < 0.03, out
    np.testing.assert_allclose(sum(out["freq"]), 1.0)
    # A collapsed generator: all mass on one class.
    ones = x[labels == 1]
    h = m.class_histogram(ones)
    assert h["tv_uniform"] > 0.8 and h["kl_uniform"] > 0.8 * math.log(10)
    # Closed forms of the histogram distances.
    h = class_histogram(torch.tensor([3, 3, 3, 3]))
    assert h["tv_uniform"] == pytest.approx(0.9) and h["kl_uniform"] == pytest.approx(math.log(10))
    h = class_histogram(torch.arange(10).repeat(7), reference_freq=torch.full((10,), 0.1))
    assert h["tv_uniform"] == pytest.approx(0.0, abs=1e-12) and h["kl_data"] == pytest.approx(0.0, abs=1e-12)
