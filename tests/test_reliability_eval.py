"""Evaluation refuses, before the first sample, what it would otherwise score wrongly or fail on at the end
(engine/evaluate.py, engine/metrics/reference_stats.py): a diffusion denoiser under few-step schedules, a
text-to-image network without captions (and samples it with them when given), reference statistics that are not
covariances, not finite, of another dimension or not an .npz, an --out that is a file, a sample count whose features
cannot be held, latents given as reference data, a network on 2-D points. Each refusal is one line with exit
status 2 (engine.cli.run_main) and leaves every file as it was."""
import json
import re

import edm_pickle_writer as W
import numpy as np
import pytest
import torch
from inception_writer import pytorch_fid_state, random_inception
from test_reliability import cli, recipe, snapshot

from engine.checkpoints.releases import export_safetensors
from engine.data import write_image_dataset, write_latent_dataset
from engine.data.captions import CaptionStore, write_caption_store
from engine.evaluate import caption_conditions, held_bytes, network_kind
from engine.evaluate import main as evaluate_main
from engine.metrics.reference_stats import StatsError, load_stats
from engine.metrics.reference_stats import main as stats_main
from engine.networks import DiT, MMDiT, build_network
from engine.pipelines.edm2_presets import build_edm2_preset
from engine.precond import CMPrecond, EDMPrecond

pytestmark = [pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")]

UNET = dict(img_resolution=8, in_channels=3, out_channels=3, model_channels=8, channel_mult=[1], num_blocks=1,
            attn_resolutions=[])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A consistency release, an EDM teacher .pkl, an EDM2 teacher .pkl and the detector (random weights, NVIDIA's
    layout)."""
    d = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    export_safetensors(CMPrecond(build_network("digits-ddpmpp", **UNET)).eval(), str(d / "cm.safetensors"))
    teacher = EDMPrecond(build_network("digits-ddpmpp", **UNET, augment_dim=9))
    W.write_pickle(W.snapshot(W.network_record(teacher, W.edm_init_kwargs(teacher.model.init_kwargs))),
                   d / "edm-teacher.pkl")
    W.write_pickle(W.edm2_snapshot(W.edm2_network_record(build_edm2_preset("edm2-tiny"))), d / "edm2-teacher.pkl")
    inception = d / "pt_inception-2015-12-05-6726825d.pth"    # pytorch-fid's layout: the quickest to write
    torch.save(pytorch_fid_state(random_inception()), inception)
    return d, str(inception)


def never_samples(monkeypatch):
    """Make drawing a sample an error, so a refusal is seen to come before sampling."""
    def sample_batch(*a, **k):
        raise AssertionError("a sample was drawn before the inputs were checked")
    monkeypatch.setattr("engine.evaluate.sample_batch", sample_batch)


def refused(argv, message, capsys, watch, main=evaluate_main):
    """Run the command line: exit status 2, one error line matching `message`, nothing under `watch` changed and
    no --out written."""
    before = snapshot(watch)
    code, err = cli(main, argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and " error: " in lines[0], err
    assert re.search(message, lines[0]), lines[0]
    assert snapshot(watch) == before
    return lines[0]


# ---- 1. diffusion denoisers are sampled with heun only ---------------------------------------------------------------

@pytest.mark.parametrize("name, what", [("edm-teacher.pkl", r"EDMPrecond: EDM-loss training"),
                                        ("edm2-teacher.pkl", r"EDM2Precond with its uncertainty head: EDM2-loss")])
def test_a_diffusion_denoiser_needs_heun(files, name, what, capsys, monkeypatch, tmp_path):
    d, _ = files
    net = str(d / name)
    common = ["--net", net, "--metrics", "none", "--num-samples", "2", "--batch", "2"]
    never_samples(monkeypatch)
    for schedules in ([], ["--schedules", "80"], ["--schedules", "heun:2", "80,0.821"]):
        refused(common + schedules + ["--out", str(tmp_path / "o")],
                rf"--net .*{name} is a diffusion denoiser \({what}.*not a consistency model or flow map: .*"
                r"sample it with --schedules heun\[:N\]", capsys, d)
        assert not (tmp_path / "o").exists()
    monkeypatch.undo()
    res = evaluate_main(common + ["--schedules", "heun:2", "--out", str(tmp_path / "o")])   # what it should run
    assert list(res) == ["heun-2 (3 NFE)"] and res["heun-2 (3 NFE)"]["grid"].dtype == torch.uint8


def test_network_kind_follows_the_loaded_classes():
    mlp = lambda: build_network("gmm-mlp", hidden_channels=8, num_blocks=1)
    tiny = dict(input_size=4, patch_size=2, in_channels=4, hidden_size=16, depth=1, num_heads=2)
    assert network_kind(EDMPrecond(mlp())) == "diffusion" and network_kind(CMPrecond(mlp())) == "consistency"
    assert network_kind(build_edm2_preset("edm2-tiny")) == "diffusion"
    assert network_kind(build_edm2_preset("edm2-tiny", logvar_channels=None)) == "consistency"  # the students
    assert network_kind(DiT(**tiny)) == "flow map" and network_kind(DiT(**tiny, mean_flow=False)) == "velocity"
    assert network_kind(mlp()) is None and network_kind(lambda x, s, labels=None: x) is None


# ---- 2. text-to-image networks are conditioned on captions -----------------------------------------------------------

@pytest.fixture(scope="module")
def t2i(tmp_path_factory):
    """A tiny Mean Flow MM-DiT release, a caption store of its context shape, and a small SD VAE decoder file."""
    from safetensors.torch import save_file

    from engine.perceptual.vae import LatentDecoder
    d = tmp_path_factory.mktemp("t2i")
    torch.manual_seed(0)
    net = MMDiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, context_dim=12,
                context_tokens=5, projector_dim=16, z_dim=8, encoder_depth=1).eval()
    export_safetensors(net, str(d / "mmdit.safetensors"))
    g = np.random.default_rng(1)
    write_caption_store(d / "val.captions", g.normal(size=(7, 5, 12)), np.array([0, 2, 3, 7]), g.normal(size=(5, 12)),
                        [["a", "b"], ["c"], ["d", "e", "f", "g"]])
    vae = LatentDecoder(channels=(32, 32, 64, 64))
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0, 0.05)
    save_file({k: v for k, v in vae.state_dict().items() if k not in ("scale", "bias")}, str(d / "vae.safetensors"))
    return d, net


def test_a_text_to_image_network_needs_captions_and_is_conditioned_on_them(t2i, files, capsys, monkeypatch):
    from engine.perceptual.vae import LatentDecoder
    d, net = t2i
    common = ["--net", str(d / "mmdit.safetensors"), "--metrics", "none", "--num-samples", "3", "--batch", "2",
              "--vae", str(d / "vae.safetensors"), "--latent-convention", "sd"]
    never_samples(monkeypatch)
    refused(common + ["--out", str(d / "o")], r"--net .*mmdit.safetensors is a text-to-image MMDiT: give the captions"
            r" .*\(--captions <caption store>, python -m engine.pipelines.encode_captions.*null caption", capsys, d)
    refused(["--net", str(files[0] / "cm.safetensors"), "--metrics", "none", "--captions", str(d / "val.captions"),
             "--out", str(d / "o")], r"--captions: .*cm.safetensors is not a text-to-image network", capsys, d)
    monkeypatch.undo()
    import engine.evaluate
    seen, sampler = [], engine.evaluate.mean_flow_sampler

    def spy(flow, z, t_steps, labels=None):    # what each batch was conditioned on
        seen.append(labels)
        return sampler(flow, z, t_steps, labels)
    monkeypatch.setattr("engine.evaluate.mean_flow_sampler", spy)
    res = evaluate_main(common + ["--captions", str(d / "val.captions"), "--schedules", "1", "--save-samples",
                                  "--out", str(d / "o")])
    store = CaptionStore(d / "val.captions")
    # each seed's caption features, drawn as the recipe's FID-30k draws them (recipes/coco_t2i_cmt_mf.py)
    assert recipe("coco_t2i_cmt_mf").caption_conditions is caption_conditions
    ours = caption_conditions(store)
    assert len({tuple(c.flatten()[:3].tolist()) for c in ours(range(40))}) == 7   # every caption is drawn
    assert len(seen) == 2 and torch.equal(seen[0], ours([0, 1])) and torch.equal(seen[1], ours([2]))
    rows = {tuple(np.asarray(store.captions[r], np.float32).flatten()[:3]) for r in range(7)}
    assert {tuple(c.flatten()[:3].tolist()) for c in ours([0, 1, 2])} <= rows    # rows of the store
    z = torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(s)) for s in range(3)])
    with torch.no_grad():
        want = LatentDecoder.from_file(str(d / "vae.safetensors"), convention="sd")(
            sampler(net, z, (1.0,), ours([0, 1, 2])))
    got = res["1-step"]["samples"]
    assert got.shape == (3, 3, 64, 64) and (got.int() - want.int()).abs().max() <= 1   # batches of 2 and 1 vs 3
    assert json.load(open(d / "o" / "report.json"))["captions"]["store"] == str(d / "val.captions")


# ---- 3, 4, 7. reference statistics are checked when read, before sampling -------------------------------------------

def _npz(path, mu, sigma):
    np.savez(path, mu=mu, sigma=sigma, fid_preprocessing=np.array("nvidia"))
    return str(path)


def test_statistics_that_are_not_covariances_are_refused(files, tmp_path, capsys, monkeypatch):
    d, inception = files
    eye = np.eye(64)      # refused when read, before the dimension is compared with the detector's
    asym = eye.copy()
    asym[0, 1] = 0.5
    bad = {"sigma is not positive semi-definite \\(smallest eigenvalue -1, largest -1\\)": -eye,
           r"sigma is not symmetric \(max \|Σ − Σᵀ\| = 0.5 against max \|Σ\| = 1\)": asym}
    never_samples(monkeypatch)
    for message, sigma in bad.items():
        stats = _npz(tmp_path / "bad.npz", np.zeros(64), sigma)
        refused(["--net", str(d / "cm.safetensors"), "--stats", stats, "--inception", inception, "--out",
                 str(tmp_path / "o")], rf"bad\.npz: {message}, so it is not a covariance", capsys,
                tmp_path)
    assert not (tmp_path / "o").exists()


def test_the_covariance_checks_keep_rounding_and_rank_deficiency(tmp_path):
    """The tolerances are relative to the scale: a rank-deficient covariance (fewer samples than dimensions) and
    rounding-level asymmetry or negative eigenvalues pass; a defect of 1e-3 of the scale does not."""
    f = np.random.default_rng(0).normal(size=(20, 300)) * 1e3
    sigma = np.cov(f, rowvar=False)
    assert np.linalg.eigvalsh(sigma)[0] < 0                      # rounding leaves negative eigenvalues
    load_stats(_npz(tmp_path / "a.npz", f.mean(0), sigma))
    w, v = np.linalg.eigh(sigma)
    scale = np.abs(sigma).max()
    for eps, ok in ((1e-9, True), (1e-3, False)):
        shifted = (v * np.where(np.arange(300) == 0, -eps * scale, w)) @ v.T
        shifted = 0.5 * (shifted + shifted.T)
        if ok:
            load_stats(_npz(tmp_path / "b.npz", f.mean(0), shifted))
        else:
            with pytest.raises(StatsError, match="not positive semi-definite"):
                load_stats(_npz(tmp_path / "b.npz", f.mean(0), shifted))
        skew = sigma.copy()
        skew[3, 5] += eps * scale
        if ok:
            load_stats(_npz(tmp_path / "c.npz", f.mean(0), skew))
        else:
            with pytest.raises(StatsError, match="not symmetric"):
                load_stats(_npz(tmp_path / "c.npz", f.mean(0), skew))


@pytest.mark.parametrize("case, message", [
    ("nan", r"ref\.npz: mu has 1 non-finite entries \(NaN or inf\)"),
    ("inf", r"ref\.npz: sigma has 1 non-finite entries \(NaN or inf\)"),
    ("dim", r"ref\.npz hold 8-dimensional fid features; the fid detector's are 2048-dimensional"),
    ("text", r"ref\.npz is not an \.npz archive \(a zip of \.npy arrays, as np\.savez and EDM write\): it is text"),
    ("npy", r"ref\.npz is not an \.npz archive .*: it is a single NumPy array \(\.npy\)"),
    ("out", r"--out .*report is a file; the run directory must be a folder"),
])
def test_inputs_are_checked_before_sampling(files, tmp_path, case, message, capsys, monkeypatch):
    d, inception = files
    mu, sigma = np.zeros(2048), np.eye(2048)
    stats = tmp_path / "ref.npz"
    if case == "nan":
        mu[7] = np.nan
    if case == "inf":
        sigma[3, 3] = np.inf
    if case == "dim":
        mu, sigma = np.zeros(8), np.eye(8)
    _npz(stats, mu, sigma)
    if case == "text":
        stats.write_text("mu 0 0 0\n")
    if case == "npy":
        with open(stats, "wb") as f:
            np.save(f, mu)
    out = tmp_path / ("report" if case == "out" else "o")
    if case == "out":
        out.write_text("a file")
    never_samples(monkeypatch)
    refused(["--net", str(d / "cm.safetensors"), "--stats", str(stats), "--inception", inception, "--num-samples",
             "4", "--out", str(out)], message, capsys, tmp_path)
    assert case == "out" or not out.exists()


def test_reference_stats_checks_out_and_data_before_computing(tmp_path, capsys, monkeypatch, files):
    _, inception = files
    write_image_dataset(tmp_path / "d.zip", np.zeros((2, 3, 8, 8), np.uint8))
    write_latent_dataset(tmp_path / "l.zip", np.abs(np.random.default_rng(0).normal(size=(2, 8, 4, 4))))
    (tmp_path / "file").write_text("x")

    def computed(*a, **k):
        raise AssertionError("features were computed before the inputs were checked")
    monkeypatch.setattr("engine.metrics.reference_stats.dataset_stats", computed)
    common = ["--inception", inception, "--device", "cpu"]
    for data, out, message in [
        ("d.zip", "", r"--out .* is a directory; give the statistics file to write"),
        ("d.zip", "file/ref.pkl", r"--out .*file/ref\.pkl: .*file is a file, so the statistics cannot be created"),
        ("d.zip", "ref.npz --metrics fid,fd_dinov2", r"--out .*ref\.npz: an \.npz holds FID statistics only"),
        ("l.zip", "ref.npz", r"--data .*l\.zip holds 4-channel VAE latents \(python -m engine.pipelines.encode_latents"
                             r"\), not images; .*give the image dataset the latents were encoded from"),
    ]:
        out, *more = out.split(" ")
        refused(["--data", str(tmp_path / data), "--out", str(tmp_path / out), *more, *common], message, capsys,
                tmp_path, main=stats_main)


# ---- 5. a sample count whose features cannot be held -----------------------------------------------------------------

def test_a_sample_count_beyond_memory_is_refused(files, capsys, monkeypatch, tmp_path):
    d, _ = files
    never_samples(monkeypatch)
    message = (r"--num-samples 1000000000000: evaluation holds 7451 GiB until the end \(each sample's features, 0 "
               r"bytes, and an entry per batch of 128\), more than this machine's .* GiB of memory")
    refused(["--net", str(d / "cm.safetensors"), "--metrics", "none", "--num-samples", str(10 ** 12), "--out",
             str(tmp_path / "o")], message, capsys, d)
    assert held_bytes(50_000, 128, [2048, 1024]) == 50_000 * 4 * 3072 + 391 * 1024


# ---- 8. a network on 2-D points ----------------------------------------------------------------------------------------

def test_a_network_on_points_is_not_scored_as_images(tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    export_safetensors(CMPrecond(build_network("gmm-mlp", hidden_channels=8, num_blocks=1)),
                       str(tmp_path / "gmm.safetensors"))
    never_samples(monkeypatch)
    refused(["--net", str(tmp_path / "gmm.safetensors"), "--metrics", "none", "--out", str(tmp_path / "o")],
            r"gmm\.safetensors: a MLPNet on 2-D points .* not images: FID and FD_DINOv2 do not apply; .*sliced "
            r"Wasserstein distance", capsys, tmp_path)
    assert not (tmp_path / "o").exists()
