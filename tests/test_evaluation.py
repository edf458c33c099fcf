"""Evaluation (engine/evaluate.py, engine/metrics/{dinov2,reference_stats}.py): DINOv2 weight files in the
published layout load (tests write them with random weights) and wrong ones are rejected by name; statistics
files round-trip in EDM's and EDM2's formats and carry their FID protocol; sampling is identical on 1 and 2
processes. The Inception detector itself: tests/test_inception.py."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from inception_writer import random_inception, write_torchscript

from engine.checkpoints.files import file_sha256
from engine.checkpoints.releases import export_safetensors
from engine.data import write_image_dataset
from engine.evaluate import evaluate, sample_batch, to_uint8
from engine.evaluate import main as evaluate_main
from engine.metrics import frechet_distance
from engine.metrics.dinov2 import DINOv2, read_dinov2_state
from engine.metrics.inception import InceptionV3
from engine.metrics.reference_stats import StatsError, check_fid_preprocessing, detector_record, load_stats, save_stats
from engine.metrics.reference_stats import main as stats_main
from engine.networks import build_network
from engine.precond import CMPrecond

pytestmark = [pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """NVIDIA's TorchScript layout (what `inception-2015-12-05.pt` is), random weights."""
    net = random_inception()
    path = write_torchscript(net, tmp_path_factory.mktemp("det") / "inception-2015-12-05.pt")
    return str(path), net


def images(n, res=32, seed=0):
    return torch.randint(0, 256, (n, 3, res, res), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def small_dinov2():
    torch.manual_seed(0)
    net = DINOv2(dim=64, depth=2, heads=4, mlp=128)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    return net


def test_dinov2_loads_the_released_layout_and_rejects_others(tmp_path):
    net = small_dinov2()
    state = net.state_dict()
    keys = set(state)
    assert {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "blocks.1.attn.qkv.weight",
            "blocks.0.ls1.gamma", "blocks.1.mlp.fc2.bias", "norm.weight"} <= keys
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 64)
    path = tmp_path / "dinov2_vitl14_pretrain.pth"
    torch.save(state, path)
    fresh = DINOv2(dim=64, depth=2, heads=4, mlp=128)
    fresh.load_state_dict(read_dinov2_state(path, fresh))
    x = images(2)
    out = fresh(x)
    assert out.shape == (2, 64) and torch.equal(out, net(x))
    torch.save({k: v for k, v in state.items() if k != "norm.bias"}, path)
    with pytest.raises(ValueError, match="is not DINOv2 ViT-L/14 .*missing norm.bias"):
        read_dinov2_state(path, fresh)
    with pytest.raises(FileNotFoundError, match="dinov2_vitl14_pretrain.pth"):
        DINOv2.from_file(str(tmp_path / "nope.pth"))


def test_dinov2_position_grid_resampled_to_224():
    net = small_dinov2()
    pe = net.position_embedding(16, 16)
    assert pe.shape == (1, 1 + 256, 64)
    assert torch.equal(pe[:, 0], net.pos_embed[:, 0])


def test_stats_files_round_trip_in_both_formats(tmp_path):
    g = np.random.default_rng(0)
    a, b = g.normal(size=(50, 6)), g.normal(size=(50, 4))
    stats = {"num_images": 50, "fid": (a.mean(0), np.cov(a, rowvar=False)),
             "fd_dinov2": (b.mean(0), np.cov(b, rowvar=False)),
             "detectors": {"fid": {"preprocessing": "nvidia", "file": "inception-2015-12-05.pkl", "sha256": "ab"}}}
    save_stats(tmp_path / "r.pkl", stats)
    back = load_stats(tmp_path / "r.pkl")
    assert back["num_images"] == 50
    for m in ("fid", "fd_dinov2"):
        assert all(np.array_equal(x, y) for x, y in zip(back[m], stats[m]))
    with open(tmp_path / "r.pkl", "rb") as f:  # EDM2's layout: a plain pickle of dicts of arrays
        raw = pickle.load(f)
    assert set(raw) == {"num_images", "fid", "fd_dinov2", "detectors"} and set(raw["fid"]) == {"mu", "sigma"}
    assert back["detectors"] == stats["detectors"]
    save_stats(tmp_path / "r.npz", {"fid": stats["fid"]})
    with np.load(tmp_path / "r.npz") as z:  # EDM's layout
        assert set(z.files) == {"mu", "sigma"}
    assert np.array_equal(load_stats(tmp_path / "r.npz")["fid"][1], stats["fid"][1])
    with pytest.raises(StatsError, match="an .npz holds FID statistics only"):
        save_stats(tmp_path / "x.npz", stats)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"fid": Evil()}, f)
    with pytest.raises(StatsError, match="may hold only dicts, numbers and NumPy arrays; it asks for"):
        load_stats(tmp_path / "evil.pkl")
    with pytest.raises(FileNotFoundError, match="python -m engine.metrics.reference_stats"):
        load_stats(tmp_path / "missing.npz")


def test_reference_stats_command_and_fid_of_the_data_itself(tmp_path, inception_file):
    path, _ = inception_file
    data = images(10, seed=5).numpy()
    write_image_dataset(tmp_path / "d.zip", data)
    for out in ("ref.npz", "ref.pkl"):
        stats_main(["--data", str(tmp_path / "d.zip"), "--out", str(tmp_path / out), "--inception", path,
                    "--batch", "4", "--metrics", "fid"])
    net = InceptionV3.from_file(path)
    direct = net(torch.from_numpy(data)).double()
    for out in ("ref.npz", "ref.pkl"):
        ref = load_stats(tmp_path / out)
        mu, sigma = ref["fid"]
        np.testing.assert_allclose(mu, direct.mean(0).numpy(), rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(sigma, np.cov(direct.numpy(), rowvar=False), rtol=1e-6, atol=1e-8)
        assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-10)
        # the file says which detector and protocol computed it
        assert ref["detectors"]["fid"] == {"preprocessing": "nvidia", "file": "inception-2015-12-05.pt",
                                           "sha256": file_sha256(path), "layout": "nvidia-torchscript"}
    with np.load(tmp_path / "ref.npz") as z:   # EDM's readers see mu and sigma as before
        assert str(z["fid_preprocessing"]) == "nvidia" and z["mu"].shape == (2048,)
    stats_main(["--data", str(tmp_path / "d.zip"), "--out", str(tmp_path / "pf.npz"), "--inception", path,
                "--fid-preprocessing", "pytorch-fid"])
    assert load_stats(tmp_path / "pf.npz")["detectors"]["fid"]["preprocessing"] == "pytorch-fid"


def test_fid_preprocessing_of_statistics_and_detector_must_agree(tmp_path, inception_file):
    """A FID between features of different protocols is refused naming both, before any sample is drawn;
    statistics that record no protocol (EDM's / EDM2's published files) need it declared."""
    path, _ = inception_file
    g = np.random.default_rng(0)
    f = g.normal(size=(20, 2048))
    nvidia, pf = InceptionV3.from_file(path), InceptionV3.from_file(path, preprocessing="pytorch-fid")
    save_stats(tmp_path / "pf.npz", {"fid": (f.mean(0), np.cov(f, rowvar=False)),
                                     "detectors": {"fid": detector_record(pf)}})
    save_stats(tmp_path / "legacy.npz", {"fid": (f.mean(0), np.cov(f, rowvar=False))})
    save_stats(tmp_path / "legacy.pkl", {"fid": (f.mean(0), np.cov(f, rowvar=False))})

    def never(*a, **k):
        raise AssertionError("sampled before the statistics were checked")
    never.model = None
    with pytest.raises(StatsError, match=r"FID preprocessing differs: the statistics .*pf.npz were computed with "
                                         r"'pytorch-fid' \(inception-2015-12-05.pt\), the detector runs 'nvidia'"):
        evaluate(never, (3, 8, 8), [(80.0,)], num=2, detectors={"fid": nvidia}, stats=load_stats(tmp_path / "pf.npz"))
    for legacy in ("legacy.npz", "legacy.pkl"):
        with pytest.raises(StatsError, match=r"does not say which FID preprocessing computed it .*"
                                             r"--stats-preprocessing nvidia"):
            evaluate(never, (3, 8, 8), [(80.0,)], num=2, detectors={"fid": nvidia},
                     stats=load_stats(tmp_path / legacy))
    assert check_fid_preprocessing(load_stats(tmp_path / "legacy.npz"), nvidia, declared="nvidia") == "nvidia"
    with pytest.raises(StatsError, match="records FID preprocessing 'pytorch-fid', but 'nvidia' was declared"):
        check_fid_preprocessing(load_stats(tmp_path / "pf.npz"), pf, declared="nvidia")
    assert check_fid_preprocessing(load_stats(tmp_path / "pf.npz"), pf) == "pytorch-fid"
    with pytest.raises(StatsError, match="have no fd_dinov2 entry"):
        evaluate(never, (3, 8, 8), [(80.0,)], num=2, detectors={"fd_dinov2": nvidia},
                 stats=load_stats(tmp_path / "pf.npz"))


def test_report_names_detector_hash_and_preprocessing(tmp_path, inception_file):
    path, _ = inception_file
    net, release = tiny_net(tmp_path)
    det = InceptionV3.from_file(path)
    res = evaluate(net, (3, 8, 8), [(80.0,)], num=4, batch=4, detectors={"fid": det}, progress=False,
                   keep_samples=True)
    f = det(res["1-step"]["samples"]).double().numpy()
    save_stats(tmp_path / "ref.npz", {"fid": (f.mean(0), np.cov(f, rowvar=False))})   # as EDM's: no protocol
    common = ["--net", release, "--stats", str(tmp_path / "ref.npz"), "--inception", path, "--num-samples", "4",
              "--batch", "4", "--schedules", "80", "--out", str(tmp_path / "eval")]
    with pytest.raises(StatsError, match="does not say which FID preprocessing"):
        evaluate_main(common)
    evaluate_main(common + ["--stats-preprocessing", "nvidia"])
    report = json.load(open(tmp_path / "eval" / "report.json"))
    assert report["detectors"]["fid"] == {"file": path, "sha256": file_sha256(path), "layout": "nvidia-torchscript",
                                          "code_check": det.describe()["code_check"], "preprocessing": "nvidia",
                                          "resize": det.preprocessing.resize, "scaling": "(x - 128) / 128"}
    assert report["stats"]["fid_preprocessing"] == "nvidia" and report["stats"]["sha256"] == file_sha256(
        tmp_path / "ref.npz")
    assert report["results"]["1-step"]["fid"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(StatsError, match="FID preprocessing differs"):
        evaluate_main(common + ["--stats-preprocessing", "nvidia", "--fid-preprocessing", "pytorch-fid"])


def tiny_net(tmp_path):
    torch.manual_seed(0)
    net = CMPrecond(build_network("digits-ddpmpp", img_resolution=8, in_channels=3, out_channels=3,
                                  model_channels=8)).eval()
    path = tmp_path / "net.safetensors"
    export_safetensors(net, str(path))
    return net, str(path)


def test_samples_do_not_depend_on_batching(tmp_path):
    net, _ = tiny_net(tmp_path)
    a = sample_batch(net, list(range(6)), (3, 8, 8), (80.0, 0.821), 0, "cpu")
    b = torch.cat([sample_batch(net, [s], (3, 8, 8), (80.0, 0.821), 0, "cpu") for s in range(6)])
    assert a.dtype == torch.uint8 and torch.allclose(a.float(), b.float(), atol=1)  # per-seed noise
    assert torch.equal(to_uint8(torch.tensor([-1.0, 0.0, 0.999, 1.0])), torch.tensor([0, 128, 255, 255],
                                                                                     dtype=torch.uint8))


def test_two_processes_give_the_same_samples_as_one(tmp_path):
    _, path = tiny_net(tmp_path)
    common = ["-m", "engine.evaluate", "--net", path, "--metrics", "none", "--num-samples", "14", "--batch", "4",
              "--save-samples"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    # --standalone: torchrun binds its own store's port. A port picked here and closed again could be taken by
    # another test's processes before torchrun binds it (the suite runs two pytest-xdist workers side by side).
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          *common, "--out", str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-6000:]
    a, b = np.load(tmp_path / "one" / "samples.npz"), np.load(tmp_path / "two" / "samples.npz")
    assert set(a.files) == {"1-step", "2-step"}
    for k in a.files:
        assert a[k].shape == (14, 3, 8, 8) and np.array_equal(a[k], b[k])
    import json
    report = json.load(open(tmp_path / "two" / "report.json"))
    assert report["world_size"] == 2 and report["seeds"] == [0, 13]
    assert os.path.exists(tmp_path / "two" / "grid-2-step.png")


def test_fid_api_with_a_detector(tmp_path, inception_file):
    path, _ = inception_file
    net, _ = tiny_net(tmp_path)
    det = {"fid": InceptionV3.from_file(path)}
    res = evaluate(net, (3, 8, 8), [(80.0,)], num=6, batch=4, detectors=det, progress=False, keep_samples=True)
    samples = res["1-step"]["samples"]
    f = det["fid"](samples).double().numpy()
    stats = {"fid": (f.mean(0), np.cov(f, rowvar=False)), "detectors": {"fid": detector_record(det["fid"])}}
    res = evaluate(net, (3, 8, 8), [(80.0,)], num=6, batch=3, detectors=det, stats=stats, progress=False)
    assert res["1-step"]["fid"] == pytest.approx(0.0, abs=1e-6)  # the same samples at another batch size


def test_paper_recipe_fid_step(tmp_path, inception_file, monkeypatch, capsys):
    """The paper recipes end with 1- and 2-step FID when the detector and statistics are given, else print the
    command; the FID is the evaluation protocol's (same samples, same detector), recorded with the detector's
    file, hash and preprocessing; statistics that do not fit the detector stop the recipe before it trains."""
    import dataclasses
    import types

    from engine.pipelines import edm_cm as cm_recipes
    from engine.pipelines.recipe import check_fid_inputs
    path, _ = inception_file
    net, _ = tiny_net(tmp_path)
    s = dataclasses.replace(cm_recipes.PaperSettings(dataset="x", resolution=8, q=4), fid_samples=5)
    run = types.SimpleNamespace(out=str(tmp_path), device="cpu")
    assert cm_recipes._fid(net, s, run, smoke=False) == ({}, {})
    assert "python -m engine.evaluate --net" in capsys.readouterr().out
    det = {"fid": InceptionV3.from_file(path)}
    res = evaluate(net, (3, 8, 8), [(80.0,)], num=5, batch=5, detectors=det, progress=False, keep_samples=True)
    f = det["fid"](res["1-step"]["samples"]).double().numpy()
    save_stats(tmp_path / "ref.npz", {"fid": (f.mean(0), np.cov(f, rowvar=False))})
    monkeypatch.setenv("ENGINE_INCEPTION_WEIGHTS", path)
    monkeypatch.setenv("ENGINE_FID_STATS", str(tmp_path / "ref.npz"))
    with pytest.raises(SystemExit, match="closing FID cannot be computed: .* does not say which FID preprocessing"):
        check_fid_inputs("cpu")
    monkeypatch.setenv("ENGINE_FID_STATS_PREPROCESSING", "nvidia")
    check_fid_inputs("cpu")
    one, two = cm_recipes._fid(net, s, run, smoke=False)
    assert one["fid"] == pytest.approx(0.0, abs=1e-6) and two["fid"] > 0
    for r in (one, two):
        assert r["fid_detector"]["preprocessing"] == "nvidia" and r["fid_detector"]["sha256"] == file_sha256(path)
        assert r["fid_detector"]["stats"] == str(tmp_path / "ref.npz")
    monkeypatch.setenv("ENGINE_FID_PREPROCESSING", "pytorch-fid")
    with pytest.raises(SystemExit, match="FID preprocessing differs"):
        check_fid_inputs("cpu")


def test_vae_decoder_loads_diffusers_layouts_and_decodes_edm2_latents(tmp_path):
    from safetensors.torch import save_file

    from engine.perceptual.vae import BIAS, SCALE, LatentDecoder
    torch.manual_seed(0)
    small = (32, 32, 64, 64)
    ref = LatentDecoder(channels=small)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.05)
    state = {k: v for k, v in ref.state_dict().items() if k not in ("scale", "bias")}
    # the older diffusers attention names (sd-vae-ft-mse's file) plus encoder tensors that must be ignored
    old = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
           .replace(".to_out.0.", ".proj_attn."): v.clone() for k, v in state.items()}
    old["encoder.conv_in.weight"] = torch.zeros(1)
    save_file(old, str(tmp_path / "vae.safetensors"))
    dec = LatentDecoder(channels=small).load_vae_state(
        __import__("engine.perceptual.vae", fromlist=["read_vae_file"]).read_vae_file(tmp_path / "vae.safetensors"))
    final = torch.randn(3, 4, 4, 4) * 0.5
    img = dec(final, chunk=2)
    assert img.dtype == torch.uint8 and img.shape == (3, 3, 32, 32)
    assert torch.equal(img, ref(final))
    raw = (final - torch.tensor(BIAS).reshape(1, 4, 1, 1)) / torch.tensor(SCALE).reshape(1, 4, 1, 1)
    x = ref.decoder(ref.post_quant_conv(raw))
    assert torch.equal(img, (x.clamp(0, 1) * 255).to(torch.uint8))  # EDM2: [0, 1] range, truncation
    save_file(old, str(tmp_path / "narrow.safetensors"))   # the widths are read from the file (smoke VAEs)
    assert torch.equal(LatentDecoder.from_file(str(tmp_path / "narrow.safetensors"))(final), img)
    del old["decoder.conv_out.bias"]
    save_file(old, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="not the SD VAE .*missing .*decoder.conv_out.bias"):
        LatentDecoder.from_file(str(tmp_path / "bad.safetensors"))
    with pytest.raises(FileNotFoundError, match="stabilityai/sd-vae-ft-mse"):
        LatentDecoder.from_file(str(tmp_path / "none.safetensors"))


def test_latent_network_samples_are_decoded():
    from engine.perceptual.vae import LatentDecoder
    torch.manual_seed(0)
    net = CMPrecond(build_network("digits-ddpmpp", img_resolution=8, in_channels=4, out_channels=4,
                                  model_channels=8)).eval()
    dec = LatentDecoder(channels=(32, 32, 64, 64))
    res = evaluate(net, (4, 8, 8), [(80.0,)], num=3, batch=2, decode=dec, progress=False, keep_samples=True)
    s = res["1-step"]["samples"]
    assert s.dtype == torch.uint8 and s.shape == (3, 3, 64, 64)
    z = torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(i)) for i in range(3)]) * 80
    with torch.no_grad():  # one batch of 3 here against batches of 2 and 1 there: one grey level of rounding
        assert (s.int() - dec(net(z, torch.full((3,), 80.0))).int()).abs().max() <= 1


def test_mean_flow_networks_are_sampled_with_their_own_sampler(tmp_path):
    """A DiT release goes through the Mean Flow sampler (t schedules, z ← z − (t − r)·u), per-seed noise."""
    from engine.evaluate import default_schedules
    from engine.networks import DiT
    from engine.perceptual.vae import LatentDecoder
    from engine.solvers import mean_flow_uniform
    torch.manual_seed(0)
    net = DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=16, depth=1, num_heads=2, num_classes=5).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    assert default_schedules(net) == [(1.0,), (1.0, 0.5)]
    res = evaluate(net, (4, 4, 4), default_schedules(net), num=3, batch=3, progress=False, keep_samples=True,
                   decode=lambda x: x.clamp(-1, 1))
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    z = torch.stack([torch.randn((4, 4, 4), generator=g) for g in gens])
    y = torch.tensor([int(torch.randint(5, (1,), generator=g)) for g in gens])
    for steps, key in ((1, "1-step"), (2, "2-step t=1,0.5")):
        expected = to_uint8(mean_flow_uniform(net, z, steps, y).clamp(-1, 1))
        assert (res[key]["samples"].int() - expected.int()).abs().max() <= 1
    sd = LatentDecoder(channels=(32, 32, 64, 64), convention="sd")
    raw = torch.randn(1, 4, 2, 2)
    with torch.no_grad():
        x = sd.decoder(sd.post_quant_conv(raw))
    assert torch.equal(sd(raw * 0.18215), (((x + 1) / 2).clamp(0, 1) * 255).to(torch.uint8))
