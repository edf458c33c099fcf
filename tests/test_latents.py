"""Latent datasets (EDM2's .npy moments, engine/data/image_dataset.py) and the posterior-sampling objective wrapper
(engine/objectives/latent.py)."""
import io
import zipfile

import numpy as np
import pytest
import torch

from engine.data import DatasetError, ImageDataset, edm_latent_name, write_latent_dataset
from engine.data.sampler import LatentSource
from engine.objectives import LatentPosterior, StepRNG
from engine.objectives.base import LossOutput, Objective
from engine.objectives.latent import posterior_sample
from engine.perceptual.vae import BIAS, SCALE


def moments(n=5, c=4, res=6, seed=0):
    g = np.random.default_rng(seed)
    return np.concatenate([g.normal(size=(n, c, res, res)), g.uniform(0.1, 1, size=(n, c, res, res))],
                          axis=1).astype(np.float32)


@pytest.mark.parametrize("dest", ["lat.zip", "lat"])
def test_latent_dataset_round_trip(tmp_path, dest):
    m = moments()
    path = write_latent_dataset(tmp_path / dest, m, [3, 1, 4, 1, 5])
    ds = ImageDataset(path, validate="full")
    assert ds.is_latent and ds.image_shape == [8, 6, 6] and len(ds) == 5 and ds.label_dim == 6
    assert ds.image_names[1] == edm_latent_name(1) == "00000/img-mean-std-00000001.npy"
    x, y = LatentSource(ds).batch(torch.tensor([4, 0]), "cpu")
    assert torch.equal(x, torch.from_numpy(m[[4, 0]])) and y.tolist() == [5, 3]
    with pytest.raises(FileExistsError):
        write_latent_dataset(tmp_path / dest, m)


def test_a_rewritten_archive_is_byte_identical_whatever_the_clock(tmp_path, monkeypatch):
    """Smoke runs and encode commands rewrite their datasets on a rerun; the run identity hashes the zip's index,
    which holds each member's date, so the bytes must not depend on when they were written."""
    import time

    from engine.checkpoints.identity import dataset_fingerprint
    m = moments()[:3]
    a, b = tmp_path / "a.zip", tmp_path / "b.zip"
    write_latent_dataset(a, m, [0, 1, 2])
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 86_400 * 400)      # a year and more later
    write_latent_dataset(b, m, [0, 1, 2])
    assert a.read_bytes() == b.read_bytes()
    assert dataset_fingerprint(a)["index_sha256"] == dataset_fingerprint(b)["index_sha256"]
    with zipfile.ZipFile(b) as z:
        assert {i.date_time for i in z.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert {i.external_attr >> 16 for i in z.infolist()} == {0o644}
    x, y = LatentSource(ImageDataset(b, validate="full")).batch(torch.tensor([2, 1]), "cpu")
    assert torch.equal(x, torch.from_numpy(m[[2, 1]])) and y.tolist() == [2, 1]


def test_latent_dataset_errors(tmp_path):
    with pytest.raises(DatasetError, match="std channels"):
        write_latent_dataset(tmp_path / "neg.zip", -moments())
    with pytest.raises(DatasetError, match="float \\[N, 2·C, H, W\\]"):
        write_latent_dataset(tmp_path / "odd.zip", moments()[:, :7])
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as zf:
        buf = io.BytesIO()
        np.save(buf, moments(1)[0])
        zf.writestr(edm_latent_name(0), buf.getvalue())
        zf.writestr(edm_latent_name(1), b"\x93NUMPY garbage")
    with pytest.raises(DatasetError, match="img-mean-std-00000001.npy.*cannot be read as a .npy array"):
        ImageDataset(path)
    mixed = tmp_path / "mixed"
    write_latent_dataset(mixed, moments(2))
    (mixed / "00000" / "img00000000.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="mixes images"):
        ImageDataset(mixed)
    shape = tmp_path / "shape.zip"
    with zipfile.ZipFile(shape, "w") as zf:
        for i, a in enumerate((moments(1)[0], moments(1, res=4)[0])):
            buf = io.BytesIO()
            np.save(buf, a)
            zf.writestr(edm_latent_name(i), buf.getvalue())
    with pytest.raises(DatasetError, match="differ in resolution"):
        ImageDataset(shape)


class Spy(Objective):
    def __init__(self):
        self.seen = None

    def images_per_step(self, batch_size):
        return batch_size // 2

    def __call__(self, net, images, labels, rng):
        self.seen = images
        self.after = rng.randn([3], images.device)
        return LossOutput(loss=images.reshape(len(images), -1).sum(1), pairs=len(images))


@pytest.mark.parametrize("convention", ["sd", "edm2"])
def test_posterior_sample_in_model_space(convention):
    """z = mean + std·n from the step's stream, then ×0.18215 (sd) or ·scale_c + bias_c (edm2), in float64 by hand;
    the inner objective's own draws follow the posterior noise."""
    m = torch.from_numpy(moments(3).astype(np.float64))
    spy = Spy()
    obj = LatentPosterior(spy, convention)
    assert obj.images_per_step(8) == 4 and obj.name == "objective@latents"
    obj(None, m, None, StepRNG.for_step(0, 0, 7))
    rng = StepRNG.for_step(0, 0, 7)
    n = rng.randn([3, 4, 6, 6], "cpu", torch.float32).double()
    z = m[:, :4] + m[:, 4:] * n
    if convention == "sd":
        ref = z * 0.18215
    else:
        ref = z * torch.tensor(SCALE, dtype=torch.float64).reshape(1, 4, 1, 1) + \
            torch.tensor(BIAS, dtype=torch.float64).reshape(1, 4, 1, 1)
    torch.testing.assert_close(spy.seen.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(spy.after, rng.randn([3], "cpu"))
    with pytest.raises(ValueError, match="posterior moments"):
        obj(None, m[:, :7], None, StepRNG.for_step(0, 0, 7))
    with pytest.raises(ValueError, match="convention"):
        posterior_sample(m, n, "vae")


def _diffusers_vae(channels=(32, 32, 64, 64)):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=channels, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                        norm_num_groups=32)
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0, 0.05)
    return vae


def test_vae_encoder_and_decoder_equal_diffusers():
    """engine.perceptual.vae's encoder and decoder against diffusers' AutoencoderKL (the reference implementation) with
    the
    same random weights, in float64. Agreement is to ~1e-7 relative rather than 1e-15 because diffusers computes
    the attention softmax in float32 (upcast_softmax)."""
    from engine.perceptual.vae import LatentDecoder, LatentEncoder
    channels = (32, 32, 64, 64)
    vae = _diffusers_vae(channels).double()
    state = vae.state_dict()
    enc = LatentEncoder(channels=channels, convention="sd").load_vae_state(state).double()
    dec = LatentDecoder(channels=channels, convention="sd").load_vae_state(state)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        post = vae.encode(images.double() / 127.5 - 1).latent_dist
        moments = enc(images)
        z = torch.randn(2, 4, 4, 4, dtype=torch.float64)
        ref = vae.decode(z).sample
        ours = dec.decoder.double()(dec.post_quant_conv.double()(z))
    for got, want in ((moments[:, :4], post.mean), (moments[:, 4:], post.std), (ours, ref)):
        assert (got - want).abs().max() <= 1e-6 * want.abs().max()
    with pytest.raises(ValueError, match="uint8 RGB images"):
        enc(images.float())
    with pytest.raises(ValueError, match="not the SD VAE .* encoder"):
        LatentEncoder(channels=(32, 32, 32, 32)).load_vae_state(state)


def test_encode_latents_command_writes_a_latent_dataset(tmp_path):
    """python -m engine.pipelines.encode_latents: images → EDM2 .npy moments with the labels carried over, equal to
    the encoder applied directly; a missing VAE file is named."""
    from safetensors.torch import save_file

    from engine.data import write_image_dataset
    from engine.perceptual.vae import LatentEncoder
    from engine.pipelines.encode_latents import main
    vae = _diffusers_vae()
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(tmp_path / "vae.safetensors"))
    g = np.random.default_rng(0)
    images = g.integers(0, 256, size=(5, 16, 16, 3), dtype=np.uint8)
    data = write_image_dataset(tmp_path / "img.zip", images, [2, 0, 1, 1, 2])
    out = main(["--data", str(data), "--vae", str(tmp_path / "vae.safetensors"), "--out",
                str(tmp_path / "lat.zip"), "--batch", "2", "--device", "cpu"])
    ds = ImageDataset(out, validate="full")
    assert ds.is_latent and ds.image_shape == [8, 2, 2] and len(ds) == 5
    x, y = LatentSource(ds).batch(torch.arange(5), "cpu")
    assert y.tolist() == [2, 0, 1, 1, 2]
    enc = LatentEncoder(channels=(32, 32, 64, 64)).load_vae_state(vae.state_dict())
    torch.testing.assert_close(x, enc(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()))
    with pytest.raises(FileNotFoundError, match="stabilityai/sd-vae-ft-mse"):    # one line through run_main
        main(["--data", str(data), "--vae", str(tmp_path / "absent.safetensors"), "--out", str(tmp_path / "x.zip")])
