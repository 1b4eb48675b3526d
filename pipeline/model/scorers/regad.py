"""RegAD (Huang et al., "Registration based Few-Shot Anomaly Detection", ECCV 2022).

Model. A torchvision CNN's first three stages (ResNet-18's ``layer1``–``layer3`` in the paper;
any torchvision CNN here, stages picked by output stride 4 / 8 / 16 with the machinery of
``pipeline.model.scorers.cnn``) with a spatial transformer (STN) after each stage *inside*
the forward pass: stage i+1 reads stage i's warped features. The official code
(MediaBrain-SJTU/RegAD, ``models/stn.py``) uses the ``rotation_scale`` STN: a localisation
net (conv3×3→BN→ReLU→maxpool, twice, to 64 then 16 channels; Linear to 1024, ReLU, Linear to
3 parameters whose weight starts at zero and bias at (0, 1, 1), so every STN starts as the
identity) predicts an angle a and scales (sx, sy), giving θ = [[sx·cos a, −sin a, 0],
[sin a, sy·cos a, 0]], applied with ``affine_grid`` / ``grid_sample`` (bilinear, reflection
padding, ``align_corners=False``).

Training (``pipeline.train.regad``) is Siamese, as the official ``train.py``: the warped
last-stage map of a query and the mean of the warped last-stage maps of K support images of
the same category go through an encoder (1×1 conv→BN→ReLU, twice, then 1×1 conv) and a
predictor (1×1 conv→BN→ReLU→1×1 conv); the loss is the symmetric negative cosine similarity
with stop-gradient on the encoder outputs (SimSiam's), per feature-map position:
``L = ½·D(p₁, sg(z₂)) + ½·D(p₂, sg(z₁))``, D = −mean cos (``losses/norm_loss.py`` CosLoss).

Scoring a group (the official ``test.py``). Features are the *registered* stage maps: each
stage's warped map transformed back through the inverse of its own STN and then of every
earlier STN (``stn{1,2,3}_output``), so all maps are again aligned with the input pixels. The
k normal references are augmented (``augment_references``: the originals, rotations by
±π/16, ±π/8, ±3π/16, ±π/4, translations by (±0.2, ±0.2) and (±0.1, ±0.1) of the half-size,
a horizontal flip, greyscale, and rotations by 90°, 180°, 270°: 22 views per reference).
The three registered maps are concatenated along channels, the coarser ones repeated over
the finest grid (the official ``embedding_concat``), and all channels are kept (no random
subset, unlike PaDiM). At every position the n = 22k views give a Gaussian with the sample
mean and the unbiased sample covariance plus 0.01·I (``torch.cov(...) + 0.01 * I``). A
query's map is the Mahalanobis distance of its registered features at every position; its
image score is the maximum of that map after bilinear upsampling to the input's pixels and a
Gaussian blur of σ = 4 (scipy's ``gaussian_filter``), as the official code does before its
min–max normalisation over the test set (a monotone map over the whole set, not needed for
per-image scores). The official test also computes a Siamese loss map but never uses it.

Σ is εI plus a rank-(n−1) term, so the distance uses the Woodbury form of PaDiM
(``pipeline.model.scorers.padim``: ``PadimMemory``, ``Padim.distance_map``, ``Padim.score``)
with the shrinkage switched off: ρ = 0, a = ε, c = 1/(n − 1). The Ledoit–Wolf estimate of
our PaDiM is not used: RegAD's covariance is the plain sample covariance.

Design of the seam. The augmentation needs pixels, the scorer only sees Features. So the
extractor turns reference *pixels* into the Features of all their augmented views
(``RegadExtractor.extract_references``: 22k rows), and the scorer's ``build_memory`` takes
those Features like any other scorer's memory builder (``Regad.augments_references`` tells
the job to call ``extract_references`` instead of ``extract`` for this scorer's references).
Queries go through the ordinary ``extract``.

Where we differ from the official code, and why:
- Pixels are normalised with the weights' ImageNet mean and std (the official code feeds
  [0, 1] pixels to ImageNet weights, its Normalize is commented out). Greyscale is computed
  on the un-normalised pixels (kornia's weights 0.299, 0.587, 0.114) and normalised again;
  the geometric augmentations commute with the per-channel normalisation.
- 90° rotations use ``torch.rot90`` (exact on square inputs) instead of kornia's bilinear
  rotate; the three angles are all used, so the direction of rotation does not matter.
"""
from __future__ import annotations

import math
import operator
import posixpath
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.maps import InputGeometry
from pipeline.model.precision import FP32, module_dtype, module_precision, to_input, to_precision
from pipeline.model.scorers.base import (ExtractorEntry, Features, Models, Option, ScorerEntry,
                                         ScorerOutput, batch_size)
from pipeline.model.scorers.cnn import (CnnLoadError, CnnSpec, _module_name, _resolve_device,
                                        _transform, load_staged, stage_key)
from pipeline.model.scorers.padim import Padim, PadimMemory
from pipeline.model.shared import shared
from pipeline.model.weights import seeded

DEFAULT_REGAD_BACKBONE = "resnet18"  # the paper's
DEFAULT_REGAD_WEIGHTS = "IMAGENET1K_V1"
REGAD_STRIDES = (4, 8, 16)  # ResNet-18's layer1..layer3
DEFAULT_REGAD_IMAGE_SIZE = 224  # official --img_size
STN_MODE = "rotation_scale"  # official default --stn_mode
EPSILON = 0.01  # official: torch.cov(...) + 0.01 * I
SIGMA = 4.0  # official: gaussian_filter(..., sigma=4)
STN_HIDDEN = 1024  # official localisation net's hidden width
# (kind, parameters) of every view of a reference, in the official test.py's order after the
# original: small rotations (radians), translations (fractions of the half-size, affine_grid's
# units), a horizontal flip, greyscale, rotations by multiples of 90°.
_SMALL_ANGLES = (-math.pi / 4, -3 * math.pi / 16, -math.pi / 8, -math.pi / 16,
                 math.pi / 16, math.pi / 8, 3 * math.pi / 16, math.pi / 4)
_SHIFTS = ((0.2, 0.2), (-0.2, 0.2), (-0.2, -0.2), (0.2, -0.2),
           (0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1), (0.1, -0.1))
AUGMENTATIONS: tuple[str, ...] = (
    "original",
    *(f"rotate:{a:.6f}" for a in _SMALL_ANGLES),
    *(f"translate:{a:+.1f},{b:+.1f}" for a, b in _SHIFTS),
    "hflip", "grey",
    *(f"rot90:{k}" for k in (1, 2, 3)),
)
VIEWS = len(AUGMENTATIONS)  # 22
_GREY = (0.299, 0.587, 0.114)  # kornia.color.rgb_to_grayscale's weights


class RegadError(RuntimeError):
    """The RegAD model cannot be built from what was given; the message says why."""


# --------------------------------------------------------------------------------------------
# Geometry: the STN's transform, its inverse, warping
# --------------------------------------------------------------------------------------------


def rotation_scale_theta(params: torch.Tensor) -> torch.Tensor:
    """(B, 3) [angle, sx, sy] → (B, 2, 3) θ of the official ``rotation_scale`` mode:
    [[sx·cos a, −sin a, 0], [sin a, sy·cos a, 0]]."""
    a, sx, sy = params.unbind(1)
    cos, sin, zero = torch.cos(a), torch.sin(a), torch.zeros_like(a)
    row0 = torch.stack([cos * sx, -sin, zero], dim=1)
    row1 = torch.stack([sin, cos * sy, zero], dim=1)
    return torch.stack([row0, row1], dim=1)


def invert_affine(theta: torch.Tensor) -> torch.Tensor:
    """(B, 2, 3) θ = [A | t] → (B, 2, 3) its inverse [A⁻¹ | −A⁻¹t] (the official code inverts
    the 3×3 matrix with a [0, 0, 1] row appended; same thing)."""
    a, t = theta[:, :, :2], theta[:, :, 2:]
    inv = torch.linalg.inv(a)
    return torch.cat([inv, -inv @ t], dim=2)


def warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample (B, C, H, W) maps at ``affine_grid(θ)``: bilinear, reflection at the border."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False)


def _pooled_side(n: int) -> int:
    """A side after MaxPool2d(3, stride 2, padding 1): ⌈n / 2⌉."""
    return (n - 1) // 2 + 1


class SpatialTransformer(nn.Module):
    """The official ``STNModule`` in ``rotation_scale`` mode for a (B, channels, *grid) map.

    forward(x) → (warped (B, C, H, W), θ (B, 2, 3)); identity at initialisation.
    """

    def __init__(self, channels: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(channels, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(64, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        h, w = (_pooled_side(_pooled_side(s)) for s in grid)
        self.fc = nn.Sequential(nn.Linear(16 * h * w, STN_HIDDEN), nn.ReLU(True),
                                nn.Linear(STN_HIDDEN, 3))
        with torch.no_grad():
            self.fc[2].weight.zero_()
            self.fc[2].bias.copy_(torch.tensor([0.0, 1.0, 1.0]))

    def theta(self, x: torch.Tensor) -> torch.Tensor:
        return rotation_scale_theta(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # θ and the warp in the transformer's own dtype, the map leaving in its input's: a
        # bf16 extractor keeps its transformers in fp32 (``RegadExtractor``), since a bf16
        # sampling grid (8 bits of mantissa) would misplace the samples. For fp32 maps both
        # conversions are no-ops.
        dtype = self.fc[0].weight.dtype
        theta = self.theta(x.to(dtype))
        return warp(x.to(dtype), theta).to(x.dtype), theta


# --------------------------------------------------------------------------------------------
# Siamese heads and the registration loss
# --------------------------------------------------------------------------------------------


def _conv1x1(c: int) -> nn.Conv2d:
    return nn.Conv2d(c, c, 1, bias=False)


class Encoder(nn.Module):
    """Official ``Encoder`` (256 channels for ResNet-18, here the last stage's C):
    1×1 conv→BN→ReLU, 1×1 conv→BN→ReLU, 1×1 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(_conv1x1(channels), nn.BatchNorm2d(channels), nn.ReLU(),
                                 _conv1x1(channels), nn.BatchNorm2d(channels), nn.ReLU(),
                                 _conv1x1(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Predictor(nn.Module):
    """Official ``Predictor``: 1×1 conv→BN→ReLU, 1×1 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(_conv1x1(channels), nn.BatchNorm2d(channels), nn.ReLU(),
                                 _conv1x1(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """D(p, z) = −mean over (batch, positions) of cos(p, sg(z)) along channels; (B, C, H, W)."""
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()


def symmetric_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor,
                   z2: torch.Tensor) -> torch.Tensor:
    """½·D(p₁, z₂) + ½·D(p₂, z₁) (the official ``train.py``)."""
    return negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2


# --------------------------------------------------------------------------------------------
# The network: CNN stages with STNs inside the forward pass
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegadSpec:
    """What RegAD network to build. ``weights`` initialises the CNN (a torchvision weights
    name, a state-dict file or ``random[:SEED]``); ``seed`` initialises the STNs and heads."""

    backbone: str = DEFAULT_REGAD_BACKBONE
    weights: str = DEFAULT_REGAD_WEIGHTS
    strides: tuple[int, ...] = REGAD_STRIDES
    image_size: int = DEFAULT_REGAD_IMAGE_SIZE
    seed: int = 0

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"RegAD needs an input of at least 16 pixels, got {self.image_size}")
        if not self.strides or list(self.strides) != sorted(set(self.strides)):
            raise ValueError(f"strides must be distinct and increasing, got {self.strides}")

    def cnn_spec(self) -> CnnSpec:
        # The official input: Resize(img_size) without a crop; on square images this is
        # resize-then-center-crop to image_size.
        return CnnSpec(self.backbone, self.weights, self.strides, image_size=self.image_size,
                       resize_size=self.image_size)


def _theta_key(key: str) -> str:
    return f"theta_{key}"


def _insert_transformers(graph: "torch.fx.Graph", keys: Sequence[str]) -> None:
    """After each stage node of ``graph`` (a feature extractor returning {key: node}), insert
    ``stn{i}`` and let every later node read its warped output; return the warped maps and θs.

    Each stage node is a cut vertex of the CNN's graph, so after this no path from the input
    to a later stage bypasses a transformer."""
    out = next(n for n in graph.nodes if n.op == "output")
    stages = dict(out.args[0])
    returns: dict[str, Any] = {}
    for i, key in enumerate(keys, start=1):
        node = stages[key]
        with graph.inserting_after(node):
            call = graph.call_module(f"stn{i}", (node,))
        with graph.inserting_after(call):
            warped = graph.call_function(operator.getitem, (call, 0))
        with graph.inserting_after(warped):
            theta = graph.call_function(operator.getitem, (call, 1))
        node.replace_all_uses_with(warped, delete_user_cb=lambda user, c=call: user is not c)
        returns[key], returns[_theta_key(key)] = warped, theta
    out.args = (returns,)
    graph.eliminate_dead_code()
    graph.lint()


@dataclass(frozen=True)
class StageInfo:
    key: str  # Features key, stage_key(stride)
    node: str  # the CNN graph node it follows
    name: str  # the module whose last node it is (``layer2``)
    stride: int
    channels: int
    grid: tuple[int, int]  # at the spec's image size


class RegadModel(nn.Module):
    """The CNN stages with their STNs (``backbone``), the Siamese ``encoder`` and ``predictor``.

    backbone(pixels) → {stage key: warped (B, C, h, w), "theta_<key>": (B, 2, 3)}
    registered(out)  → {stage key: the warped map transformed back into the input's frame}

    State-dict keys: ``backbone.<torchvision key>`` for the CNN (only the modules the first
    stages use), ``backbone.stn{i}.*``, ``encoder.*``, ``predictor.*``.
    """

    def __init__(self, spec: RegadSpec) -> None:
        from torchvision.models.feature_extraction import create_feature_extractor

        super().__init__()
        self.spec = spec
        staged = load_staged(spec.cnn_spec())
        model, graph, chosen = staged.model, staged.graph, staged.chosen
        self.weights_label, self.mean, self.std = staged.weights_label, staged.mean, staged.std
        keys = [stage_key(s) for s in spec.strides]
        net = create_feature_extractor(model, return_nodes={chosen[k]: k for k in keys})
        net.eval()
        size = spec.image_size
        with torch.no_grad():
            probe = net(torch.zeros(1, 3, size, size))
        self.stages = {
            k: StageInfo(k, chosen[k], _module_name(chosen[k], graph.nodes),
                         graph.stride[chosen[k]], int(probe[k].shape[1]),
                         (int(probe[k].shape[2]), int(probe[k].shape[3])))
            for k in keys}
        with seeded(spec.seed):
            for i, k in enumerate(keys, start=1):
                name = f"stn{i}"
                if hasattr(net, name):
                    raise RegadError(f"{spec.backbone} already has a module named {name!r}")
                net.add_submodule(name, SpatialTransformer(self.stages[k].channels,
                                                           self.stages[k].grid))
            last = self.stages[keys[-1]].channels
            self.encoder = Encoder(last)
            self.predictor = Predictor(last)
        for g in {id(net.train_graph): net.train_graph, id(net.eval_graph): net.eval_graph}.values():
            _insert_transformers(g, keys)
        net.recompile()
        self.backbone = net
        self.keys = tuple(keys)
        self.requires_grad_(True)
        self.eval()

    @property
    def last_key(self) -> str:
        return self.keys[-1]

    @property
    def stage_names(self) -> str:
        """``s4=layer1,s8=layer2,s16=layer3``."""
        return ",".join(f"{k}={s.name}" for k, s in self.stages.items())

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.backbone(pixels)

    def registered(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each stage's warped map sent back through the inverse of its own STN, then of each
        earlier one (official ``stn{i}_output``): (B, C, h, w) per stage key."""
        inverses = [invert_affine(out[_theta_key(k)]) for k in self.keys]
        maps = {}
        for i, k in enumerate(self.keys):
            x = out[k]
            for inv in reversed(inverses[:i + 1]):
                x = warp(x, inv)
            maps[k] = x
        return maps

    def siamese_loss(self, queries: torch.Tensor, supports: torch.Tensor) -> torch.Tensor:
        """The registration loss of B queries (B, 3, H, W), each with K supports of its
        category (B, K, 3, H, W): query map vs the mean of its supports' maps (official
        ``train.py``; the queries and the supports are two forwards, as there)."""
        b, k = supports.shape[:2]
        q = self(queries)[self.last_key]
        s = self(supports.flatten(0, 1))[self.last_key]
        s = s.view(b, k, *s.shape[1:]).mean(dim=1)
        z1, z2 = self.encoder(q), self.encoder(s)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return symmetric_loss(p1, p2, z1, z2)

    def identity_transformers(self) -> None:
        """Reset every STN to the identity (the untrained RegAD of the comparison)."""
        for i in range(1, len(self.keys) + 1):
            fc = getattr(self.backbone, f"stn{i}").fc[2]
            with torch.no_grad():
                fc.weight.zero_()
                fc.bias.copy_(torch.tensor([0.0, 1.0, 1.0]))


# --------------------------------------------------------------------------------------------
# Augmentation of the references (official test.py)
# --------------------------------------------------------------------------------------------


def _affine(x: torch.Tensor, matrix: list[list[float]]) -> torch.Tensor:
    theta = torch.tensor(matrix, dtype=x.dtype, device=x.device).expand(x.shape[0], 2, 3)
    return warp(x, theta)


def augment_references(pixels: torch.Tensor, mean: Sequence[float],
                       std: Sequence[float]) -> torch.Tensor:
    """The 22 official views of k normalised references: (k, 3, H, W) → (22k, 3, H, W),
    view-major (all originals, then every reference rotated by −π/4, ...), in the order of
    ``AUGMENTATIONS``. ``mean``/``std``: the normalisation, undone for greyscale only."""
    views = [pixels]
    for a in _SMALL_ANGLES:
        c, s = math.cos(a), math.sin(a)
        views.append(_affine(pixels, [[c, -s, 0.0], [s, c, 0.0]]))
    for a, b in _SHIFTS:
        views.append(_affine(pixels, [[1.0, 0.0, a], [0.0, 1.0, b]]))
    views.append(pixels.flip(-1))
    m = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    sd = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    w = torch.tensor(_GREY, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    grey = ((pixels * sd + m) * w).sum(dim=1, keepdim=True)
    views.append((grey - m) / sd)
    views.extend(torch.rot90(pixels, k, dims=(2, 3)) for k in (1, 2, 3))
    return torch.cat(views)


# --------------------------------------------------------------------------------------------
# Extractor and scorer behind the seam
# --------------------------------------------------------------------------------------------


def views_key(key: str) -> str:
    """The Features key of the augmented views of the map ``key`` (``s8`` → ``views_s8``)."""
    return f"views_{key}"


class RegadExtractor:
    """Registered stage maps of a (trained) ``RegadModel``, frozen, for scoring.

    identity: ``regad:<backbone>@<init weights>[s4=layer1,...]@<size>#<checkpoint hash>``
    extract(pixels)            → {stage key: (B, C, h, w)} registered maps, float32
    extract_references(pixels) → the same for the 22 views of each reference: (22k, ...)

    In bf16 (``precision``) the CNN stages run with bf16 weights and input, channels-last;
    the spatial transformers (small, and where a bf16 grid would misplace samples) and the
    registration back into the input's frame stay fp32.
    """

    def __init__(self, model: RegadModel, checkpoint_hash: str = "untrained",
                 device: str = "cpu", batch_size: int = 32, precision: str = FP32) -> None:
        self.device = _resolve_device(device)
        self.dtype = module_dtype(self.device, precision)
        self.channels_last = self.dtype == torch.bfloat16
        self.model = model.to(self.device).eval().requires_grad_(False)
        to_precision(self.model, self.dtype, self.channels_last)
        for module in self.model.modules():
            if isinstance(module, SpatialTransformer):
                module.float()
        self.batch_size = batch_size
        spec = model.spec
        self.mean, self.std = model.mean, model.std
        self.strides = tuple(s.stride for s in model.stages.values())
        self.identity = (f"regad:{spec.backbone}@{model.weights_label}[{model.stage_names}]"
                         f"@{spec.image_size}#{checkpoint_hash}"
                         + (f"@{precision}" if precision != FP32 else ""))

    def preprocess(self) -> Callable[[Any], torch.Tensor]:
        """PIL image → (3, S, S): resize to S (official ``Resize(img_size)``), center crop,
        normalised with the CNN weights' mean and std."""
        return _transform(self.model.spec.cnn_spec(), self.mean, self.std)

    def extract(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            out = self.model(to_input(pixels, self.device, self.dtype, self.channels_last))
            out = {k: v.float() for k, v in out.items()}  # registered in fp32
            return {k: v.float().contiguous() for k, v in self.model.registered(out).items()}

    def reference_views(self, pixels: torch.Tensor) -> torch.Tensor:
        """(k, 3, S, S) → (22k, 3, S, S), the official augmentations."""
        return augment_references(pixels.to(self.device, torch.float32), self.mean, self.std)

    def extract_references(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The references' own maps and, under ``views_key(key)``, those of every augmented
        view of each: (B, VIEWS, C, h, w), so that a batch of references stays a batch (the
        job splits and stacks features image by image)."""
        b = pixels.shape[0]
        views = self.reference_views(pixels)  # (VIEWS·B, 3, H, W), view-major
        parts = [self.extract(views[i:i + self.batch_size])
                 for i in range(0, views.shape[0], self.batch_size)]
        if not parts:
            return {}
        out = self.extract(pixels)
        for key in parts[0]:
            flat = torch.cat([p[key] for p in parts])
            out[views_key(key)] = flat.view(VIEWS, b, *flat.shape[1:]).transpose(0, 1)
        return out


def sample_gaussian(samples: torch.Tensor, epsilon: float = EPSILON
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RegAD's Gaussian per position in the Woodbury form.

    samples: (P, n, d), n ≥ 2 views at each of P positions
    returns mean (P, d), centred samples X (P, n, d), inner (P, n, n) = c·(εI + cXXᵀ)⁻¹ with
    c = 1/(n − 1), so that Σ = cXᵀX + εI and Σ⁻¹ = (I − Xᵀ·inner·X)/ε.
    """
    _, n, _ = samples.shape
    if n < 2:
        raise ValueError(f"a sample covariance needs at least 2 samples, got {n}")
    mean = samples.mean(dim=1)
    x = samples - mean.unsqueeze(1)
    c = 1.0 / (n - 1)
    gram = (x.double() @ x.double().transpose(1, 2))
    eye = torch.eye(n, dtype=torch.float64, device=x.device)
    inner = (c * torch.linalg.inv(epsilon * eye + c * gram)).to(samples.dtype)
    return mean, x, inner


class Regad:
    """RegAD's scorer on a ``RegadExtractor``'s registered maps (keys ``s4``, ``s8``, ``s16``).

    build_memory(references) → PadimMemory; ``references`` are the Features of the augmented
                               views (``RegadExtractor.extract_references``), n ≥ 2 rows
    score(queries, memory)   → score (B,) max of the blurred upsampled map,
                               patch_map (B, h, w) Mahalanobis distances on the finest grid,
                               components {"map_max": (B,) max of the raw map}
    """

    name = "regad"
    min_k = 1
    uses_pooled = False
    #: the job must extract the references with ``extract_references`` (augmented views)
    augments_references = True

    def __init__(self, strides: tuple[int, ...] = REGAD_STRIDES, epsilon: float = EPSILON,
                 sigma: float = SIGMA) -> None:
        if not strides or epsilon <= 0:
            raise ValueError("RegAD needs strides and epsilon > 0")
        self.strides = tuple(sorted(strides))
        self.epsilon = epsilon
        self.sigma = sigma
        # Its embedding (nearest repeat to the finest grid), distance and image score are
        # PaDiM's; every channel is kept.
        self._padim = Padim(self.strides, n_features=1, epsilon=epsilon, sigma=sigma)

    def embed(self, features: Features) -> torch.Tensor:
        """(B, P, d): the registered maps concatenated, coarser ones repeated (nearest)."""
        return self._padim.embed(features)

    def build_memory(self, references: Features, context=None) -> PadimMemory:
        views = {k: references[views_key(k)] for k in (stage_key(s) for s in self.strides)
                 if views_key(k) in references}
        if views:  # the job's per-image layout: (k, VIEWS, C, h, w) → (k·VIEWS, C, h, w)
            references = {k: v.flatten(0, 1) for k, v in views.items()}
        n = batch_size(references)
        if n < 2:
            raise ValueError(f"{self.name} needs the augmented views of at least 1 reference "
                             f"(2 or more feature rows), got {n}")
        first = references[stage_key(self.strides[0])]
        h, w = first.shape[-2:]
        x = self.embed(references).transpose(0, 1).contiguous()  # (P, n, d)
        mean, centered, inner = sample_gaussian(x, self.epsilon)
        alpha = torch.full((x.shape[0],), self.epsilon, dtype=x.dtype, device=x.device)
        channels = torch.arange(x.shape[2], device=x.device)
        return PadimMemory(mean, centered, inner, alpha, channels, (h, w), self.strides[0])

    def score(self, queries: Features, memory: PadimMemory) -> ScorerOutput:
        return self._padim.score(queries, memory)


# --------------------------------------------------------------------------------------------
# Checkpoint: the whole network (CNN stages, STNs, heads) with its metadata
# --------------------------------------------------------------------------------------------

REGAD_FORMAT = "regad/1"
_WHAT = "RegAD checkpoint"


def regad_metadata(model: RegadModel, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything needed to rebuild and check ``model``, plus ``extra`` (training settings)."""
    spec = model.spec
    return {
        "format": REGAD_FORMAT, "backbone": spec.backbone, "init_weights": model.weights_label,
        "strides": list(spec.strides), "image_size": spec.image_size,
        "stages": {k: s.node for k, s in model.stages.items()},
        "stage_modules": {k: s.name for k, s in model.stages.items()},
        "stn_mode": STN_MODE, "mean": list(model.mean), "std": list(model.std),
        "augmentations": list(AUGMENTATIONS), "epsilon": EPSILON, "sigma": SIGMA,
        "extra": dict(extra or {}),
    }


def save_regad(model: RegadModel, path: str, extra: dict[str, Any] | None = None) -> str:
    """Write the whole network as safetensors with ``regad_metadata``; returns its hash."""
    from pipeline.model.scorers.saved import save_trained

    return save_trained(path, model.state_dict(), regad_metadata(model, extra))


def load_regad(path: str) -> tuple[RegadModel, dict[str, Any], str]:
    """(model in eval mode, metadata, content hash) of a file from ``save_regad``.

    The architecture is rebuilt from the metadata (backbone, strides, input size) and must
    have the same stage nodes; the weights must fit it exactly. Any mismatch is one
    ``TrainedScorerError``."""
    from pipeline.model.scorers.saved import TrainedScorerError, load_trained, require

    state, meta, digest = load_trained(path, REGAD_FORMAT, _WHAT)
    require(meta, ("backbone", "init_weights", "strides", "image_size", "stages", "stn_mode",
                   "mean", "std", "augmentations"), path, _WHAT)
    if meta["stn_mode"] != STN_MODE or list(meta["augmentations"]) != list(AUGMENTATIONS):
        raise TrainedScorerError(f"{path}: STN mode {meta['stn_mode']!r} / augmentations "
                                 f"{meta['augmentations']} are not this version's "
                                 f"({STN_MODE!r}, {list(AUGMENTATIONS)})")
    try:
        spec = RegadSpec(meta["backbone"], "random:0", tuple(meta["strides"]),
                         int(meta["image_size"]))
        model = RegadModel(spec)
    except (CnnLoadError, RegadError, ValueError) as exc:
        raise TrainedScorerError(f"{path}: cannot rebuild its network: {exc}") from exc
    nodes = {k: s.node for k, s in model.stages.items()}
    if nodes != meta["stages"]:
        raise TrainedScorerError(f"{path} was trained on stages {meta['stages']}; this "
                                 f"torchvision's {meta['backbone']} gives {nodes}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise TrainedScorerError(f"{path}: weights do not fit the network: {exc}") from exc
    model.weights_label = str(meta["init_weights"])
    model.mean, model.std = tuple(meta["mean"]), tuple(meta["std"])
    return model.eval(), meta, digest


def load_regad_scorer(path: str, device: str = "cpu", precision: str = FP32
                      ) -> tuple[RegadExtractor, Regad, dict[str, Any], str]:
    """The extractor and scorer of a RegAD checkpoint, and its metadata and hash."""
    model, meta, digest = load_regad(path)
    extractor = RegadExtractor(model, digest, device, precision=precision)
    scorer = Regad(tuple(meta["strides"]), float(meta.get("epsilon", EPSILON)),
                   float(meta.get("sigma", SIGMA)))
    return extractor, scorer, meta, digest


# --------------------------------------------------------------------------------------------
# The entries: RegAD is its own extractor (its trained network) and a scorer on it
# --------------------------------------------------------------------------------------------

REGAD = "regad"
TRAIN_HINT = ("train one with: python -m pipeline train --method regad --manifest AUX.parquet "
              "--output DIR (it writes DIR/regad.safetensors)")


@dataclass(frozen=True)
class RegadRun:
    """A RegAD checkpoint on a device, in a precision (``fp32``, ``bf16``): the
    extractor's spec."""

    checkpoint: str
    device: str = "cpu"
    precision: str = FP32

    @classmethod
    def of(cls, models: Models) -> "RegadRun":
        return cls(models.setting("regad_checkpoint"), models.device,
                   module_precision(models.device, models.precision))

    def described(self) -> tuple[dict[str, Any], str]:
        from pipeline.model.scorers.saved import describe_trained

        return describe_trained(self.checkpoint, REGAD_FORMAT, _WHAT)


def _loaded(run: RegadRun) -> tuple[RegadExtractor, Regad, dict[str, Any], str]:
    return shared(REGAD, run, lambda: load_regad_scorer(run.checkpoint, run.device,
                                                        run.precision))


class RegadExtractorEntry(ExtractorEntry):
    """The registered maps of a trained RegAD network (``--regad-checkpoint``); references
    come with their 22 official augmentations."""

    name = REGAD
    view = REGAD

    def spec(self, models: Models, needs: Sequence[Mapping[str, Any]]) -> RegadRun:
        return RegadRun.of(models)

    def _cnn(self, run: RegadRun) -> CnnSpec:
        meta, _ = run.described()
        return RegadSpec(meta["backbone"], "random:0", tuple(meta["strides"]),
                         int(meta["image_size"])).cnn_spec()

    def preprocess(self, spec: RegadRun) -> Callable[[Any], torch.Tensor]:
        meta, _ = spec.described()
        return _transform(self._cnn(spec), tuple(meta["mean"]), tuple(meta["std"]))

    def identity(self, spec: RegadRun) -> str:
        meta, digest = spec.described()
        stages = ",".join(f"{k}={v}" for k, v in sorted(meta["stage_modules"].items()))
        return (f"regad|{meta['backbone']}@{meta['init_weights']}[{stages}]"
                f"@{meta['image_size']}|checkpoint={digest}"
                # fp32 adds nothing: the identities of the runs before precision was recorded
                + (f"|precision={spec.precision}" if spec.precision != FP32 else ""))

    def load(self, spec: RegadRun) -> RegadExtractor:
        return _loaded(spec)[0]

    def geometry(self, spec: RegadRun, grid: tuple[int, int]) -> InputGeometry:
        cnn = self._cnn(spec)
        return InputGeometry.center_crop(cnn.resize, cnn.image_size)

    def descriptor(self, features: Features) -> torch.Tensor:
        """The spatial mean of the deepest registered map."""
        deepest = max((k for k in features if k.startswith("s") and k[1:].isdigit()),
                      key=lambda k: int(k[1:]))
        return features[deepest].mean(dim=(2, 3))

    def model_of(self, spec: RegadRun) -> tuple[str, str]:
        meta, digest = spec.described()
        return meta["backbone"], f"{posixpath.basename(spec.checkpoint)}#sha256={digest[:12]}"

    def augments_references(self, spec: RegadRun) -> bool:
        return True


class RegadEntry(ScorerEntry):
    """RegAD (Huang et al., ECCV 2022): trained once on auxiliary data (``train --method
    regad``), a Gaussian per position of the k references' augmented registered maps."""

    name = REGAD
    extractor = REGAD
    min_k = Regad.min_k
    trainable = True
    options = (Option("regad_checkpoint", None,
                      "regad: the trained network (python -m pipeline train --method regad)",
                      metavar="FILE"),)

    def checkpoint(self, models: Models) -> str | None:
        return models.setting("regad_checkpoint")

    def check(self, models: Models, k: int) -> None:
        if not self.checkpoint(models):
            raise ValueError(f"regad needs --regad-checkpoint FILE; {TRAIN_HINT}")

    def build(self, models: Models) -> Regad:
        return _loaded(RegadRun.of(models))[1]

    def identity(self, models: Models, extractor_identity: str, checkpoint_hash: str | None
                 ) -> str:
        return f"{self.name}|{extractor_identity}"  # the extractor's names the checkpoint


REGAD_EXTRACTOR_ENTRY = RegadExtractorEntry()
REGAD_ENTRY = RegadEntry()
