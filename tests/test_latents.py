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
from engine.vae import BIAS, SCALE


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
