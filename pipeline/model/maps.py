"""Patch maps back onto the original image: upsample, smooth, undo the crop and the resize.

Every scorer returns a patch map (h, w) on its feature grid, and that grid covers the model
input (the crop) uniformly. ``InputGeometry`` records how the view's preprocessing made that
input from an original (H, W) image, resize and then crop, with torchvision's own size
rounding and crop offsets. The functions here run the preprocessing backwards: bilinear
upsampling to the input size, Gaussian smoothing there (σ in input pixels, anomalib's
``AnomalyMapGenerator``), then the crop and the resize undone. Pure torch: the tensors stay
on the device they came on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

RESIZE_MODES = ("shorter_side", "square")
CROP_ANCHORS = ("center", "top_left")

# anomalib's kernel: 2 * int(4σ + 0.5) + 1 taps, i.e. a radius of about 4σ.
_TRUNCATE = 4.0


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _size(name: str, size: tuple[int, int]) -> tuple[int, int]:
    if len(size) != 2:
        raise ValueError(f"{name} must be (height, width), got {size!r}")
    return _positive(f"{name} height", size[0]), _positive(f"{name} width", size[1])


@dataclass(frozen=True)
class InputGeometry:
    """How an original (H, W) image becomes the (crop_h, crop_w) model input.

    First a resize: ``resize_mode`` "shorter_side" scales the shorter side to ``resize`` and
    the longer one to ``int(resize * long / short)`` (torchvision truncates); "square" makes
    both sides ``resize``. Then a crop to (crop_h, crop_w): ``crop_anchor`` "center" is
    torchvision's ``CenterCrop`` (offset ``int(round((R - C) / 2))``, a crop larger than the
    resized image zero-pads it evenly, as torchvision does); "top_left" keeps the first rows
    and columns (AnomalyDINO's crop to a multiple of the patch size).

    The CLIP view is ``center_crop(S, S)``, the CNN view ``center_crop(resize, image_size)``,
    the DINO view ``square(S, h, w)`` or, keeping the aspect, ``shorter_side(S, h, w,
    "top_left")`` with (h, w) the input that image produced.
    """

    resize: int
    crop_h: int
    crop_w: int
    resize_mode: str = "shorter_side"
    crop_anchor: str = "center"

    def __post_init__(self) -> None:
        _positive("resize", self.resize)
        _positive("crop_h", self.crop_h)
        _positive("crop_w", self.crop_w)
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, "
                             f"got {self.resize_mode!r}")
        if self.crop_anchor not in CROP_ANCHORS:
            raise ValueError(f"crop_anchor must be one of {CROP_ANCHORS}, "
                             f"got {self.crop_anchor!r}")

    @classmethod
    def center_crop(cls, resize: int, crop: int | tuple[int, int]) -> "InputGeometry":
        """Shorter side to ``resize``, then a center crop to ``crop`` (a side or (h, w))."""
        crop_h, crop_w = (crop, crop) if isinstance(crop, int) else crop
        return cls(resize, crop_h, crop_w, "shorter_side", "center")

    @classmethod
    def square(cls, size: int, crop_h: int, crop_w: int) -> "InputGeometry":
        """Both sides to ``size``, then a top-left crop to (crop_h, crop_w)."""
        return cls(size, crop_h, crop_w, "square", "top_left")

    @classmethod
    def shorter_side(cls, size: int, crop_h: int, crop_w: int,
                     anchor: str = "center") -> "InputGeometry":
        """Shorter side to ``size``, then a crop to (crop_h, crop_w) at ``anchor``."""
        return cls(size, crop_h, crop_w, "shorter_side", anchor)

    def input_size(self) -> tuple[int, int]:
        """The model input's (height, width): the crop."""
        return self.crop_h, self.crop_w

    def resized_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """(height, width) of the resized image, rounded as torchvision's ``Resize`` does
        (``_compute_resized_output_size``: the longer side is truncated, not rounded)."""
        h, w = _size("original_size", original_size)
        if self.resize_mode == "square":
            return self.resize, self.resize
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.resize * long / short)
        return (new_long, self.resize) if w <= h else (self.resize, new_long)

    def crop_offset(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """(top, left) of the crop in resized-image pixels; negative where the center crop
        is larger than the resized image and torchvision pads it."""
        rh, rw = self.resized_size(original_size)
        if self.crop_anchor == "top_left":
            if self.crop_h > rh or self.crop_w > rw:
                raise ValueError(f"a top-left crop {self.input_size()} does not fit the "
                                 f"resized image {(rh, rw)} of an image of {original_size}")
            return 0, 0
        return _center_offset(rh, self.crop_h), _center_offset(rw, self.crop_w)


def _center_offset(length: int, crop: int) -> int:
    """torchvision's ``center_crop`` along one axis: pad (crop − length) // 2 before when
    the crop is larger, else start at int(round((length − crop) / 2)) (Python's round)."""
    if crop > length:
        return -((crop - length) // 2)
    return int(round((length - crop) / 2.0))


def _batched(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a (batch, height, width) tensor, got {shape}")
    return x.float()


def _gaussian_taps(sigma: float, radius: int, like: torch.Tensor) -> torch.Tensor:
    """(2·radius + 1,) normalised Gaussian weights, in ``like``'s device and dtype."""
    x = torch.arange(-radius, radius + 1, device=like.device, dtype=torch.float64)
    taps = torch.exp(-0.5 * (x / sigma) ** 2)
    return (taps / taps.sum()).to(like.dtype)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, h, w) maps as ``scipy.ndimage.gaussian_filter`` with
    its defaults computes it, which is what the reference implementations of PatchCore,
    PaDiM and SPADE call: radius int(4σ + 0.5), edges mirrored with the edge sample repeated
    (scipy's ``reflect``; ``d c b a | a b c d | d c b a``, periodically beyond the side)."""
    if sigma <= 0:
        return maps
    radius = int(_TRUNCATE * sigma + 0.5)
    out = maps
    for _ in range(2):  # blur along the last axis, then transpose and do the other
        n = out.shape[-1]
        taps = _gaussian_taps(sigma, radius, out).view(1, 1, -1)
        idx = torch.arange(-radius, n + radius, device=maps.device) % (2 * n)
        idx = torch.where(idx < n, idx, 2 * n - 1 - idx)
        padded = out.index_select(-1, idx)  # (B, h, n + 2r)
        out = F.conv1d(padded.reshape(-1, 1, n + 2 * radius), taps).view(out.shape)
        out = out.transpose(1, 2)
    return out.contiguous()


def smooth_upsample(patch_map: torch.Tensor, input_size: tuple[int, int],
                    sigma: float = 4.0) -> torch.Tensor:
    """Patch maps at model-input resolution: bilinear upsampling, then Gaussian smoothing.

    patch_map:  (B, h, w) on the feature grid that covers the input uniformly
    input_size: (Hi, Wi) the model input
    sigma:      the Gaussian's σ in input pixels (0: no smoothing); ``gaussian_blur``
    returns:    (B, Hi, Wi) float32, on patch_map's device
    """
    x = _batched(patch_map, "patch_map")
    size = _size("input_size", input_size)
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be finite and >= 0, got {sigma!r}")
    if x.shape[0] == 0:
        return x.new_zeros((0, *size))
    up = F.interpolate(x[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return gaussian_blur(up, sigma)


def to_original(input_map: torch.Tensor, geometry: InputGeometry,
                original_size: tuple[int, int]) -> torch.Tensor:
    """Maps on the model input, placed on the original image: the crop and resize undone.

    The input map goes where the crop sat in the resized image; resized pixels the crop left
    out take the value of the nearest crop pixel (replicate padding: the map is extended,
    not invented). The resized map is then resized bilinearly (half-pixel centres, the
    convention of the forward resize, antialiased where it shrinks) to the original size,
    so the scale is exactly the inverse of the one the forward resize applied.

    input_map:     (B, Hi, Wi), (Hi, Wi) = geometry.input_size()
    original_size: (H, W) of the image before preprocessing
    returns:       (B, H, W) float32, on input_map's device
    """
    x = _batched(input_map, "input_map")
    size = _size("original_size", original_size)
    if tuple(x.shape[-2:]) != geometry.input_size():
        raise ValueError(f"input_map is {tuple(x.shape[-2:])}, the geometry's input is "
                         f"{geometry.input_size()}")
    rh, rw = geometry.resized_size(size)
    top, left = geometry.crop_offset(size)
    # Resized pixel r holds input pixel r − offset, clamped to the crop: replicate padding.
    rows = (torch.arange(rh, device=x.device) - top).clamp_(0, geometry.crop_h - 1)
    cols = (torch.arange(rw, device=x.device) - left).clamp_(0, geometry.crop_w - 1)
    resized = x.index_select(1, rows).index_select(2, cols)
    if x.shape[0] == 0:
        return x.new_zeros((0, *size))
    shrinks = size[0] < rh or size[1] < rw
    out = F.interpolate(resized[:, None], size=size, mode="bilinear", align_corners=False,
                        antialias=shrinks)
    return out[:, 0]


@dataclass(frozen=True)
class Smoothing:
    """How a scorer's map is smoothed: a Gaussian of ``sigma`` pixels (0: none), in the
    model input's pixels or, ``on_original``, in the original image's (AnomalyDINO's
    official code blurs at the original size)."""

    sigma: float = 4.0
    on_original: bool = False


#: PatchCore's, PaDiM's and SPADE's reference code: σ = 4 at the 224 px input.
DEFAULT_SMOOTHING = Smoothing()


def anomaly_map(patch_map: torch.Tensor, geometry: InputGeometry,
                original_size: tuple[int, int], sigma: float = 4.0,
                on_original: bool = False) -> torch.Tensor:
    """A scorer's patch map as an anomaly map over the original image: bilinear to the
    model input, the crop and resize undone, Gaussian smoothing of ``sigma`` pixels at the
    input's resolution or, ``on_original``, at the original's.

    patch_map: (h, w) or (B, h, w) on the feature grid of the model input
    returns:   (H, W) or (B, H, W) float32, as patch_map is batched or not
    """
    single = isinstance(patch_map, torch.Tensor) and patch_map.dim() == 2
    x = patch_map[None] if single else patch_map
    up = smooth_upsample(x, geometry.input_size(), 0.0 if on_original else sigma)
    out = to_original(up, geometry, original_size)
    if on_original:
        out = gaussian_blur(out, sigma)
    return out[0] if single else out
