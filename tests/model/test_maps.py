"""Tests for pipeline.model.maps: patch maps land where the repo's real preprocessing put the
pixels they describe.

The views' transforms (open_clip's for CLIP, the CNN's and DINO's torchvision ones) are run on
images whose content says where each pixel came from: a coordinate ramp, a marked square.
The inverse mapping must send the model input back onto those original positions.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms.functional import _compute_resized_output_size

from pipeline.model.backbone import BackboneSpec, describe, tiny_spec
from pipeline.model.maps import InputGeometry, anomaly_map, smooth_upsample, to_original
from pipeline.model.scorers.cnn import IMAGENET_MEAN, IMAGENET_STD, CnnSpec, cnn_preprocess
from pipeline.model.scorers.dino import _CropToMultiple, dino_preprocess

DINO_PATCH = (14, 14)
# Non-square originals; 430 * 256 / 300 = 366.93, so truncating and rounding the longer side
# differ by a pixel, and the crops cut both sides.
LANDSCAPE, PORTRAIT = (300, 430), (430, 300)


# --- the views ---------------------------------------------------------------------------

def _clip_view(spec: BackboneSpec):
    info = describe(spec)
    side = info.geometry.image_size
    return info.preprocess, InputGeometry.center_crop(side[0], side), None


def _cnn_view():
    spec = CnnSpec(weights="random:0")
    return cnn_preprocess(spec), InputGeometry.center_crop(spec.resize, spec.image_size), None


def _dino_view(keep_aspect: bool, size: int = 100):
    transform = dino_preprocess(size, keep_aspect, DINO_PATCH, IMAGENET_MEAN, IMAGENET_STD)
    if keep_aspect:
        # The input's size depends on the image: the geometry is built from the input.
        def geometry_for(input_size):
            return InputGeometry.shorter_side(size, *input_size, anchor="top_left")
        return transform, None, geometry_for
    crop = size - size % DINO_PATCH[0]
    return transform, InputGeometry.square(size, crop, crop), None


VIEWS = {
    "clip-tiny": lambda: _clip_view(tiny_spec()),
    "clip-b16plus": lambda: _clip_view(BackboneSpec(pretrained="random:0")),
    "cnn": _cnn_view,
    "dino-square": lambda: _dino_view(False),
    "dino-aspect": lambda: _dino_view(True),
}


@pytest.fixture(params=sorted(VIEWS), scope="module")
def view(request):
    transform, geometry, geometry_for = VIEWS[request.param]()
    return request.param, transform, geometry, geometry_for


def _geometric_steps(transform) -> list:
    """The resize and crop steps of a view's Compose (the others change values, not places)."""
    steps = [t for t in transform.transforms
             if isinstance(t, (T.Resize, T.CenterCrop, _CropToMultiple))]
    assert len(steps) == 2, f"expected a resize and a crop in {transform}"
    return steps


def _geometry(view, input_size):
    _, _, geometry, geometry_for = view
    return geometry if geometry is not None else geometry_for(input_size)


# --- the geometry matches torchvision ----------------------------------------------------

@pytest.mark.parametrize("resize", [64, 224, 240, 256, 448])
def test_resized_size_is_torchvisions(resize):
    geo = InputGeometry.center_crop(resize, 32)
    for h in (31, 100, 299, 300, 301, 431, 1024):
        for w in (31, 100, 300, 430, 433, 1024, 1535):
            assert geo.resized_size((h, w)) == tuple(
                _compute_resized_output_size((h, w), [resize])), (h, w)
    square = InputGeometry.square(resize, 14, 14)
    assert square.resized_size((300, 430)) == (resize, resize)


def test_resized_size_matches_a_real_pil_resize():
    resize = T.Resize(256, interpolation=T.InterpolationMode.BILINEAR, antialias=True)
    geo = InputGeometry.center_crop(256, 224)
    for h, w in [(300, 430), (430, 300), (255, 511), (1000, 1001), (77, 1000)]:
        out = resize(Image.new("RGB", (w, h)))
        assert geo.resized_size((h, w)) == (out.height, out.width)


def test_center_crop_offset_is_torchvisions_including_padding():
    # Each resized pixel holds its own 1-based column/row number; padding shows as 0.
    for length in range(20, 40):
        for crop in range(17, 44):  # odd and even differences, crops larger than the image
            geo = InputGeometry(length, crop, crop, "square", "center")
            top, left = geo.crop_offset((length, length))
            idx = torch.arange(1, length + 1, dtype=torch.float32)
            # Read each profile along a line the padding of the other axis leaves alone.
            row, col = max(0, -top), max(0, -left)
            cols = TF.center_crop(idx.expand(length, length)[None], [crop, crop])[0, row]
            rows = TF.center_crop(idx[:, None].expand(length, length)[None],
                                  [crop, crop])[0, :, col]
            expect = [j + left + 1 if 0 <= j + left < length else 0 for j in range(crop)]
            assert cols.tolist() == expect, (length, crop)
            assert rows.tolist() == [j + top + 1 if 0 <= j + top < length else 0
                                     for j in range(crop)]


def test_top_left_crop_must_fit():
    geo = InputGeometry.shorter_side(100, 98, 140, "top_left")
    assert geo.crop_offset((300, 430)) == (0, 0)  # resized to (100, 143)
    with pytest.raises(ValueError, match="does not fit"):
        InputGeometry.shorter_side(100, 98, 150, "top_left").crop_offset((300, 430))


@pytest.mark.parametrize("bad", [
    dict(resize=0, crop_h=1, crop_w=1), dict(resize=8, crop_h=-1, crop_w=1),
    dict(resize=8, crop_h=2.5, crop_w=1), dict(resize=8, crop_h=2, crop_w=2, resize_mode="fit"),
    dict(resize=8, crop_h=2, crop_w=2, crop_anchor="bottom"),
])
def test_bad_geometry_is_refused(bad):
    with pytest.raises(ValueError):
        InputGeometry(**bad)


def test_constructors_and_input_size():
    assert InputGeometry.center_crop(256, 224) == InputGeometry(256, 224, 224)
    assert InputGeometry.center_crop(256, (200, 210)).input_size() == (200, 210)
    sq = InputGeometry.square(100, 98, 84)
    assert (sq.resize_mode, sq.crop_anchor, sq.input_size()) == ("square", "top_left", (98, 84))
    ss = InputGeometry.shorter_side(100, 98, 140, "top_left")
    assert (ss.resize_mode, ss.crop_anchor) == ("shorter_side", "top_left")
    with pytest.raises(ValueError):
        InputGeometry.shorter_side(100, 98, 140, "middle")


# --- the inverse against the real transforms ---------------------------------------------

@pytest.mark.parametrize("original", [LANDSCAPE, PORTRAIT])
def test_coordinate_ramp_comes_back(view, original):
    """Run the view's own resize and crop on an image whose pixels hold their (y, x); the
    inverse of the input must give every original pixel the crop covers its own (y, x)."""
    h, w = original
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32),
                            torch.arange(w, dtype=torch.float32), indexing="ij")
    x = torch.stack([yy, xx])
    for step in _geometric_steps(view[1]):
        x = step(x)
    geo = _geometry(view, tuple(x.shape[-2:]))
    assert tuple(x.shape[-2:]) == geo.input_size()

    back = to_original(x, geo, original)  # the two channels as a batch of two maps
    assert back.shape == (2, h, w) and back.dtype == torch.float32

    # Compare where the crop covers the original, away from the crop's edges (replicated
    # there) and the image's borders (the forward resize's filter is cut there).
    rh, rw = geo.resized_size(original)
    top, left = geo.crop_offset(original)
    margin = 3.0

    def inside(n, resized, offset, crop):
        centres = (torch.arange(n, dtype=torch.float64) + 0.5) * resized / n - 0.5 - offset
        edge = torch.minimum(centres + offset, resized - 1 - centres - offset)
        return (centres >= margin) & (centres <= crop - 1 - margin) & (edge >= margin)

    rows = inside(h, rh, top, geo.crop_h)
    cols = inside(w, rw, left, geo.crop_w)
    assert rows.sum() > 10 and cols.sum() > 10
    err_y = (back[0] - yy)[rows][:, cols].abs().max()
    err_x = (back[1] - xx)[rows][:, cols].abs().max()
    # torch's antialiased filters are cut to whole pixels, so even the forward resize bends
    # a ramp by up to ~0.08 px; a wrong scale or offset is off by a pixel or more.
    assert err_y < 0.15 and err_x < 0.15, (err_y, err_x)


def _marked(original, box):
    """A dark RGB image of ``original`` (H, W) with a white square at box = (y0, x0, side)."""
    y0, x0, side = box
    arr = np.full((*original, 3), 30, np.uint8)
    arr[y0:y0 + side, x0:x0 + side] = 230
    return Image.fromarray(arr)


def _patch_grid(geo, view_name):
    hi, wi = geo.input_size()
    patch = {"cnn": 16, "clip-tiny": 8, "clip-b16plus": 16}.get(view_name, DINO_PATCH[0])
    assert hi % patch == 0 and wi % patch == 0
    return hi // patch, wi // patch


@pytest.mark.parametrize("original, box", [
    (LANDSCAPE, (90, 155, 120)),   # around the centre
    (LANDSCAPE, (40, 200, 120)),   # upper right
    (PORTRAIT, (200, 50, 120)),    # lower left
])
def test_hot_patch_lands_on_the_marked_square(view, original, box):
    """The patch grid's hottest cell is where the real preprocessing put the square; its map
    on the original must peak inside the square, and a coverage map must centre on it."""
    name, transform = view[0], view[1]
    x = transform(_marked(original, box))  # (3, Hi, Wi), normalised
    geo = _geometry(view, tuple(x.shape[-2:]))
    mask = (x[0] > (x[0].max() + x[0].min()) / 2).float()  # the square in the input
    gh, gw = _patch_grid(geo, name)
    coverage = F.adaptive_avg_pool2d(mask[None, None], (gh, gw))[0, 0]  # (gh, gw) in [0, 1]
    # 120 original pixels are at least two patches less one pixel in every view: at least
    # one patch lies wholly on the square, and a patch away from the crop's edges.
    assert coverage.max() == 1.0, "the square should cover at least one whole patch"

    y0, x0, side = box
    hot = torch.zeros(gh, gw)
    hot.view(-1)[coverage.argmax()] = 1.0
    amap = anomaly_map(hot, geo, original)
    assert amap.shape == original
    py, px = divmod(int(amap.argmax()), original[1])
    assert y0 <= py < y0 + side and x0 <= px < x0 + side, (py, px)

    # Coverage-weighted map: its centroid is the square's centre, to a few pixels (the
    # patches quantise the square's edges; the centre is what matters).
    cmap = anomaly_map(coverage, geo, original, sigma=1.0)
    weights = (cmap - cmap.min()).clamp(min=0)
    weights = torch.where(cmap > 0.5 * cmap.max(), weights, torch.zeros_like(weights))
    ys = torch.arange(original[0], dtype=torch.float32)[:, None]
    xs = torch.arange(original[1], dtype=torch.float32)[None, :]
    cy = float((weights * ys).sum() / weights.sum())
    cx = float((weights * xs).sum() / weights.sum())
    centre = (y0 + (side - 1) / 2, x0 + (side - 1) / 2)
    # Tolerance: 2 px plus a twelfth of a patch (as wide as 60 original px along DINO's
    # squashed side); a missed crop offset or scale is off by tens of pixels.
    rh, rw = geo.resized_size(original)
    tol_y = 2 + original[0] / rh * geo.crop_h / gh / 12
    tol_x = 2 + original[1] / rw * geo.crop_w / gw / 12
    assert abs(cy - centre[0]) < tol_y and abs(cx - centre[1]) < tol_x, ((cy, cx), centre)


def test_square_view_maps_a_corner_patch_to_the_scaled_corner():
    """Square resize + top-left crop: the crop drops the resized image's last rows and
    columns, so the bottom-right patch starts where 84 / 100 of the original does, not at
    84 / 98 of it (which stretching the crop over the whole image would give)."""
    geo = InputGeometry.square(100, 98, 98)  # DINO, patch 14: 2 resized pixels dropped
    original = (300, 450)
    hot = torch.zeros(7, 7)
    hot[-1, -1] = 1.0
    amap = anomaly_map(hot, geo, original, sigma=0.0)
    # The last input patch spans resized [84, 98): original rows [252, 294), cols [378, 441).
    rows = (amap > 0.5).any(dim=1).nonzero().flatten()
    cols = (amap > 0.5).any(dim=0).nonzero().flatten()
    assert int(rows.min()) == 252 and int(cols.min()) == 378
    # Past the crop (rows 294+, cols 441+) the map is the crop's edge, replicated.
    assert int(rows.max()) == 299 and int(cols.max()) == 449
    assert amap[-1, -1] == pytest.approx(float(amap[293, 440]), abs=1e-5)


def test_placement_and_replicate_padding_are_exact():
    """With a resize that changes nothing, the original holds the input map at the crop's
    offset and, outside the crop, the nearest crop pixel."""
    geo = InputGeometry.center_crop(256, (200, 224))
    original = (256, 384)  # resized to itself; crop at (28, 80)
    assert geo.resized_size(original) == original and geo.crop_offset(original) == (28, 80)
    m = torch.rand(2, 200, 224)
    out = to_original(m, geo, original)
    assert torch.equal(out[:, 28:228, 80:304], m)
    assert torch.equal(out[:, :28, 80:304], m[:, :1].expand(2, 28, 224))
    assert torch.equal(out[:, 228:, 80:304], m[:, -1:].expand(2, 28, 224))
    assert torch.equal(out[:, 28:228, :80], m[:, :, :1].expand(2, 200, 80))
    assert torch.equal(out[:, 28:228, 304:], m[:, :, -1:].expand(2, 200, 80))
    assert torch.equal(out[:, 0, 0], m[:, 0, 0]) and torch.equal(out[:, -1, -1], m[:, -1, -1])


def test_padded_center_crop_drops_the_padding():
    """A crop larger than the resized image: torchvision pads; the padding's map values
    belong to no original pixel and must not leak in."""
    geo = InputGeometry(20, 24, 20, "square", "center")  # 2 padded rows above, 2 below
    m = torch.zeros(1, 24, 20)
    m[:, 2:22] = torch.arange(20, dtype=torch.float32)[:, None]
    m[:, :2] = m[:, 22:] = 1e6
    out = to_original(m, geo, (20, 20))
    assert torch.equal(out[0], torch.arange(20, dtype=torch.float32)[:, None].expand(20, 20))


# --- smoothing ---------------------------------------------------------------------------

@pytest.mark.parametrize("size, sigma", [((20, 23), 1.5), ((17, 19), 4.0), ((9, 11), 3.0),
                                         ((3, 70), 4.0)])
def test_smoothing_is_scipys_gaussian_filter(size, sigma):
    """The reference implementations of PatchCore (patchcore-inspection's RescaleSegmentor),
    PaDiM and SPADE smooth with ``scipy.ndimage.gaussian_filter(map, sigma=4)`` at its
    defaults (mode 'reflect', truncate 4): the same, sides shorter than the kernel included."""
    from scipy.ndimage import gaussian_filter

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, *size, generator=g)
    # Same size in and out: the bilinear step is the identity, what is left is the blur.
    got = smooth_upsample(x, size, sigma)
    for b in range(2):
        want = gaussian_filter(x[b].double().numpy(), sigma)
        np.testing.assert_allclose(got[b].numpy(), want, atol=1e-5)


def test_sigma_zero_is_plain_bilinear():
    x = torch.rand(3, 5, 7)
    want = F.interpolate(x[:, None], size=(40, 56), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(smooth_upsample(x, (40, 56), 0.0), want)
    with pytest.raises(ValueError):
        smooth_upsample(x, (40, 56), -1.0)
    with pytest.raises(ValueError):
        smooth_upsample(x, (40, 56), float("nan"))


def test_smoothing_keeps_a_constant_and_a_delta_symmetric():
    const = smooth_upsample(torch.full((2, 4, 6), 0.37), (3, 70), 4.0)  # 3 rows: radius cut
    assert torch.allclose(const, torch.full((2, 3, 70), 0.37), atol=1e-6)
    delta = torch.zeros(1, 65, 65)
    delta[0, 32, 32] = 1.0
    out = smooth_upsample(delta, (65, 65), 4.0)[0]
    assert torch.allclose(out, out.flip(0)) and torch.allclose(out, out.T, atol=1e-7)
    assert out.sum() == pytest.approx(1.0, abs=1e-5)  # far from the border: mass kept
    # σ = 4 pixels: the profile's second moment is σ².
    profile = out.sum(dim=0).double()
    offsets = torch.arange(65, dtype=torch.float64) - 32
    assert float((profile * offsets ** 2).sum()) == pytest.approx(16.0, rel=1e-3)


# --- the composition ---------------------------------------------------------------------

@pytest.mark.parametrize("geo, original", [
    (InputGeometry.center_crop(256, 224), LANDSCAPE),
    (InputGeometry.center_crop(64, 64), (40, 41)),        # original smaller: shrinks back
    (InputGeometry.square(100, 98, 98), PORTRAIT),
    (InputGeometry.shorter_side(100, 98, 140, "top_left"), LANDSCAPE),
    (InputGeometry(20, 24, 24, "shorter_side", "center"), (20, 20)),  # padded crop
])
def test_constant_map_stays_constant(geo, original):
    out = anomaly_map(torch.full((7, 7), 2.5, dtype=torch.float64), geo, original)
    assert out.shape == original and out.dtype == torch.float32
    assert torch.allclose(out, torch.full(original, 2.5), atol=1e-5)


def test_shapes_of_batches_and_single_maps():
    geo = InputGeometry.center_crop(256, 224)
    batch = torch.rand(3, 14, 14)
    out = anomaly_map(batch, geo, LANDSCAPE)
    assert out.shape == (3, *LANDSCAPE) and out.dtype == torch.float32
    single = anomaly_map(batch[1], geo, LANDSCAPE)
    assert single.shape == LANDSCAPE
    assert torch.allclose(single, out[1], atol=1e-6)  # batch members do not mix
    assert anomaly_map(torch.rand(0, 14, 14), geo, LANDSCAPE).shape == (0, *LANDSCAPE)
    assert smooth_upsample(torch.rand(2, 14, 14), (224, 224)).shape == (2, 224, 224)
    assert to_original(torch.rand(2, 224, 224), geo, PORTRAIT).shape == (2, *PORTRAIT)
    half = anomaly_map(batch.to(torch.bfloat16), geo, LANDSCAPE)
    assert half.dtype == torch.float32


def test_bad_shapes_are_refused():
    geo = InputGeometry.center_crop(256, 224)
    with pytest.raises(ValueError, match="batch, height, width"):
        smooth_upsample(torch.rand(14, 14), (224, 224))
    with pytest.raises(ValueError, match="batch, height, width"):
        anomaly_map(torch.rand(1, 1, 14, 14), geo, LANDSCAPE)
    with pytest.raises(ValueError, match="geometry's input"):
        to_original(torch.rand(1, 200, 224), geo, LANDSCAPE)
    with pytest.raises(ValueError, match="original_size"):
        to_original(torch.rand(1, 224, 224), geo, (0, 10))


def test_smoothing_on_the_original_image_blurs_after_the_resize():
    """AnomalyDINO's official map (dammsi/AnomalyDINO src/utils.py): the patch distances
    resized bilinearly to the original image, then ``gaussian_filter(σ=4)`` there."""
    from scipy.ndimage import gaussian_filter

    geo = InputGeometry.square(28, 28, 28)
    grid = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(2))
    original = (50, 70)
    got = anomaly_map(grid, geo, original, sigma=4.0, on_original=True)
    plain = anomaly_map(grid, geo, original, sigma=0.0)
    want = gaussian_filter(plain[0].double().numpy(), 4.0)
    np.testing.assert_allclose(got[0].numpy(), want, atol=1e-5)
    at_input = anomaly_map(grid, geo, original, sigma=4.0)
    assert not torch.allclose(got, at_input, atol=1e-3)  # the blur's width differs
