"""Image grids and the side-by-side picture (engine/data/image_grid.py), read back pixel for pixel."""
import numpy as np
import pytest
import torch
from PIL import Image

from engine.data.image_grid import samples_to_uint8, save_image_grid, save_labeled_panels, upscale_nearest


def test_upscale_nearest_is_the_kronecker_product_with_ones():
    x = torch.randn(3, 2, 4, 5)
    up = upscale_nearest(x, 3)
    assert up.shape == (3, 2, 12, 15)
    torch.testing.assert_close(up, torch.kron(x, torch.ones(1, 1, 3, 3)))
    assert upscale_nearest(x, 1) is x
    for bad in (0, 2.0, -1):
        with pytest.raises(ValueError, match="positive integer"):
            upscale_nearest(x, bad)


def test_grid_and_labeled_panels_hold_exactly_the_samples_pixels(tmp_path):
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(4, 1, 6, 6, generator=g) * 2 - 1, torch.rand(4, 1, 6, 6, generator=g) * 2 - 1
    grid = np.asarray(Image.open(save_image_grid(a, str(tmp_path / "g.png"), ncols=2, pad=1)))
    pix = samples_to_uint8(a)[..., 0]
    assert grid.shape == (2 * 7 + 1, 2 * 7 + 1)
    np.testing.assert_array_equal(grid[1:7, 8:14], pix[1])              # row 0, column 1
    np.testing.assert_array_equal(grid[8:14, 1:7], pix[2])              # row 1, column 0
    assert (grid[0] == 255).all() and (grid[7] == 255).all()           # the white padding

    pic = np.asarray(Image.open(save_labeled_panels([("real", a), ("model", b)], str(tmp_path / "p.png"),
                                                    ncols=2, pad=1, gap=5)))
    top, gw = 16, 2 * 7 + 1
    assert pic.shape == (top + gw, 2 * gw + 5, 3)
    for i, images in enumerate((a, b)):
        x = i * (gw + 5)
        panel = pic[top:, x:x + gw, 0]
        np.testing.assert_array_equal(panel[1:7, 1:7], samples_to_uint8(images)[0, ..., 0])
        np.testing.assert_array_equal(panel[8:14, 8:14], samples_to_uint8(images)[3, ..., 0])
        assert (pic[:top, x:x + gw] < 128).any()                         # the label is drawn above its panel
    assert (pic[top:, gw:gw + 5] == 255).all()                           # the white gap between panels
    # two rows of one panel: the second panel under the first, below its own label
    two = np.asarray(Image.open(save_labeled_panels([("real", a), ("model", b)], str(tmp_path / "r.png"),
                                                    ncols=2, pad=1, gap=5, per_row=1)))
    assert two.shape == (2 * (top + gw) + 5, gw, 3)
    np.testing.assert_array_equal(two[top + gw + 5 + top:, :, 0], pic[top:, gw + 5:, 0])
    with pytest.raises(ValueError, match="same number, size and channels"):
        save_labeled_panels([("a", a), ("c", a[:2])], str(tmp_path / "bad.png"))
    assert not (tmp_path / "bad.png").exists()
