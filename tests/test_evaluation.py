"""Evaluation (engine/evaluate.py, engine/metrics/{inception,dinov2,reference_stats}.py): detector weight files in
the published layouts load (tests write them with random weights) and wrong ones are rejected by name; statistics
files round-trip in EDM's and EDM2's formats; sampling is identical on 1 and 2 processes."""
import os
import pickle
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.checkpoints import export_safetensors
from engine.data import write_image_dataset
from engine.evaluate import evaluate, sample_batch, to_uint8
from engine.metrics import frechet_distance
from engine.metrics.dinov2 import DINOv2, read_dinov2_state
from engine.metrics.inception import PYTORCH_FID_NAMES, InceptionV3, read_inception_state
from engine.metrics.reference_stats import StatsError, load_stats, main as stats_main, save_stats
from engine.networks import build_network
from engine.precond import CMPrecond

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_inception(seed=0) -> InceptionV3:
    g = torch.Generator().manual_seed(seed)
    net = InceptionV3()
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith(".var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith(".weight") and t.ndim == 4:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g) * (2 / fan_in) ** 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return net


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A TorchScript archive in NVIDIA's layout (what `inception-2015-12-05.pt` is), random weights."""
    net = random_inception()
    path = tmp_path_factory.mktemp("det") / "inception-2015-12-05.pt"
    traced = torch.jit.trace(net, torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8))
    torch.jit.save(traced, str(path))
    return str(path), net


def images(n, res=32, seed=0):
    return torch.randint(0, 256, (n, 3, res, res), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_inception_loads_nvidia_torchscript_layout(inception_file):
    path, net = inception_file
    loaded = InceptionV3.from_file(path)
    x = images(2)
    f = loaded(x)
    assert f.shape == (2, 2048) and f.dtype == torch.float32
    assert torch.equal(f, net(x))
    assert loaded.logits(x).shape == (2, 1008)


def test_inception_loads_pytorch_fid_layout_with_folded_gamma(tmp_path):
    net = random_inception(1)
    ours = net.state_dict()
    g = torch.Generator().manual_seed(2)
    pf = {"fc.weight": ours["output.weight"], "fc.bias": ours["output.bias"]}
    for unit, tv in PYTORCH_FID_NAMES.items():
        gamma = torch.rand(ours[f"{unit}.beta"].shape, generator=g) + 0.5
        pf[f"{tv}.conv.weight"] = ours[f"{unit}.weight"] / gamma.reshape(-1, 1, 1, 1)
        pf[f"{tv}.bn.weight"] = gamma
        pf[f"{tv}.bn.bias"] = ours[f"{unit}.beta"]
        pf[f"{tv}.bn.running_mean"] = ours[f"{unit}.mean"]
        pf[f"{tv}.bn.running_var"] = ours[f"{unit}.var"]
    assert len(PYTORCH_FID_NAMES) == 94  # every conv unit of Inception-v3 has a torchvision name
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(pf, path)
    x = images(2, seed=3)
    torch.testing.assert_close(InceptionV3.from_file(str(path))(x), net(x), rtol=1e-4, atol=1e-4)


def test_inception_rejects_wrong_files(tmp_path, inception_file):
    bad = tmp_path / "torchvision_inception.pth"
    state = {k: v for k, v in random_inception().state_dict().items() if "mixed_10" not in k}
    torch.save(state, bad)
    with pytest.raises(ValueError, match="not the inception-2015-12-05 detector: missing layers.mixed_10"):
        read_inception_state(bad)
    tv = {f"{n}.conv.weight": torch.zeros(1) for n in PYTORCH_FID_NAMES.values()}
    torch.save(tv, bad)
    with pytest.raises(ValueError, match="not pytorch-fid's Inception state dict: missing"):
        read_inception_state(bad)
    text = tmp_path / "inception.pt"
    text.write_text("not weights")
    with pytest.raises(ValueError, match="not a PyTorch file"):
        read_inception_state(text)
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05.pt.*ENGINE_INCEPTION_WEIGHTS"):
        InceptionV3.from_file(str(tmp_path / "missing.pt"))


def test_inception_preprocessing_is_exact_at_299():
    """At 299×299 NVIDIA's grid is the identity: the resize changes nothing (up to the float32 rounding of the
    sampling grid: < 0.01 of a grey level), the scaling is (x − 127.5)/127.5."""
    x = images(1, res=299)
    torch.testing.assert_close(InceptionV3.preprocess(x), (x.float() - 127.5) / 127.5, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="uint8"):
        InceptionV3.preprocess(x.float())


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
             "fd_dinov2": (b.mean(0), np.cov(b, rowvar=False))}
    save_stats(tmp_path / "r.pkl", stats)
    back = load_stats(tmp_path / "r.pkl")
    assert back["num_images"] == 50
    for m in ("fid", "fd_dinov2"):
        assert all(np.array_equal(x, y) for x, y in zip(back[m], stats[m]))
    with open(tmp_path / "r.pkl", "rb") as f:  # EDM2's layout: a plain pickle of dicts of arrays
        raw = pickle.load(f)
    assert set(raw) == {"num_images", "fid", "fd_dinov2"} and set(raw["fid"]) == {"mu", "sigma"}
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
    stats_main(["--data", str(tmp_path / "d.zip"), "--out", str(tmp_path / "ref.npz"), "--inception", path,
                "--batch", "4"])
    ref = load_stats(tmp_path / "ref.npz")
    net = InceptionV3.from_file(path)
    mu, sigma = ref["fid"]
    direct = net(torch.from_numpy(data)).double()
    np.testing.assert_allclose(mu, direct.mean(0).numpy(), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(sigma, np.cov(direct.numpy(), rowvar=False), rtol=1e-6, atol=1e-8)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-10)


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


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_same_samples_as_one(tmp_path):
    _, path = tiny_net(tmp_path)
    common = ["-m", "engine.evaluate", "--net", path, "--metrics", "none", "--num-samples", "14", "--batch", "4",
              "--save-samples"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={_free_port()}", *common, "--out", str(tmp_path / "two")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
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
    stats = {"fid": (f.mean(0), np.cov(f, rowvar=False))}
    res = evaluate(net, (3, 8, 8), [(80.0,)], num=6, batch=3, detectors=det, stats=stats, progress=False)
    assert res["1-step"]["fid"] == pytest.approx(0.0, abs=1e-6)  # the same samples at another batch size


def test_paper_recipe_fid_step(tmp_path, inception_file, monkeypatch, capsys):
    """The paper recipes end with 1- and 2-step FID when the detector and statistics are given, else print the
    command; the FID is the evaluation protocol's (same samples, same detector)."""
    import dataclasses
    import types
    from engine import cm_recipes
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
    one, two = cm_recipes._fid(net, s, run, smoke=False)
    assert one["fid"] == pytest.approx(0.0, abs=1e-6) and two["fid"] > 0


def test_vae_decoder_loads_diffusers_layouts_and_decodes_edm2_latents(tmp_path):
    from safetensors.torch import save_file
    from engine.vae import BIAS, SCALE, LatentDecoder
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
        __import__("engine.vae", fromlist=["read_vae_file"]).read_vae_file(tmp_path / "vae.safetensors"))
    final = torch.randn(3, 4, 4, 4) * 0.5
    img = dec(final, chunk=2)
    assert img.dtype == torch.uint8 and img.shape == (3, 3, 32, 32)
    assert torch.equal(img, ref(final))
    raw = (final - torch.tensor(BIAS).reshape(1, 4, 1, 1)) / torch.tensor(SCALE).reshape(1, 4, 1, 1)
    x = ref.decoder(ref.post_quant_conv(raw))
    assert torch.equal(img, (x.clamp(0, 1) * 255).to(torch.uint8))  # EDM2: [0, 1] range, truncation
    del old["decoder.conv_out.bias"]
    save_file(old, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="not the SD VAE .*missing .*decoder.conv_out.bias.*wrong shape"):
        LatentDecoder.from_file(str(tmp_path / "bad.safetensors"))
    with pytest.raises(FileNotFoundError, match="stabilityai/sd-vae-ft-mse"):
        LatentDecoder.from_file(str(tmp_path / "none.safetensors"))


def test_latent_network_samples_are_decoded():
    from engine.vae import LatentDecoder
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
    from engine.objectives import mean_flow_sample
    from engine.vae import LatentDecoder
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
        expected = to_uint8(mean_flow_sample(net, z, steps, y).clamp(-1, 1))
        assert (res[key]["samples"].int() - expected.int()).abs().max() <= 1
    sd = LatentDecoder(channels=(32, 32, 64, 64), convention="sd")
    raw = torch.randn(1, 4, 2, 2)
    with torch.no_grad():
        x = sd.decoder(sd.post_quant_conv(raw))
    assert torch.equal(sd(raw * 0.18215), (((x + 1) / 2).clamp(0, 1) * 255).to(torch.uint8))
