"""An ImageNet CNN (any torchvision classification model) as a frozen multi-stage feature
extractor for the CNN scorers (SPADE, PaDiM, PatchCore).

Stages are named by output stride, not by layer: the stage at stride s is the output of the
*last block* at stride s: a block is a module whose ancestors below the model are all
``nn.Sequential`` (or ``ModuleList``) containers, its output a node that every path from the
input to the output passes through (a cut vertex of the FX graph), and of the blocks ending at
stride s the outermost ones count (ResNet's ``layer2`` rather than ``layer2.3``,
ConvNeXt's stage ``features.1`` rather than the norm inside the next downsampler
``features.2.0``). For ResNets that is
the output of ``layer1`` / ``layer2`` / ``layer3`` / ``layer4`` at strides 4 / 8 / 16 / 32,
the features the papers use; for ``mobilenet_v2`` ``features.3`` / ``features.6`` /
``features.13`` / ``features.18``; for ``efficientnet_b0`` ``features.2`` / ``features.3`` /
``features.5`` / ``features.8``; for ``convnext_tiny`` ``features.1`` / ``.3`` / ``.5`` /
``.7``. The strides are measured with one probe forward, so nothing
here knows layer names. A model without such blocks at a stride falls back to the last cut
vertex there (with a warning). ``CnnSpec.stages`` names stages instead (``--cnn-stages``):
each named module or node replaces the rule at its own stride.

Features are ``{"s4": (B, C4, H/4, W/4), "s8": ..., "pooled": (B, C)}``: one map per asked
stride and, if asked, ``pooled``, the global average of the deepest map (what the
classifier head reads; ResNet's ``avgpool``).

Weights: a torchvision weights name (``IMAGENET1K_V1``, ``DEFAULT``; fetched through
torchvision's cache under ``$TORCH_HOME``), a local state-dict file (read with
``torch.load(weights_only=True)``), or ``random[:SEED]`` (seeded random initialisation).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from pipeline.model.compiled import (CACHE_ENV, OPENVINO, RUNTIMES, TORCH, CompiledModule,
                                     check_runtime)
from pipeline.model.maps import InputGeometry
from pipeline.model.pixels import host_normalizing
from pipeline.model.precision import (BF16, FP32, module_dtype, module_precision, to_input,
                                      to_precision)
from pipeline.model.scorers.base import ExtractorEntry, Features, Models, Option, name_list
from pipeline.model.shared import shared
from pipeline.model.weights import (RANDOM_PREFIX, file_sha256, is_random, random_seed, seeded,
                                    weights_label)

LOG = logging.getLogger(__name__)

# The PatchCore and PaDiM papers' backbone and its ImageNet weights.
DEFAULT_CNN_BACKBONE = "wide_resnet50_2"
DEFAULT_CNN_WEIGHTS = "IMAGENET1K_V1"
# The papers' input: resize the short side to 256, center-crop 224.
DEFAULT_IMAGE_SIZE = 224
_RESIZE_RATIO = 256 / 224
# The normalisation torchvision's classification weights use, when the weights do not say.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

POOLED = "pooled"
_DEEPEST = "_deepest"
# Probe image (height, width) for measuring strides: non-square, so that channel-last tensors
# and pooled outputs are not mistaken for maps; both sides multiples of 64, so every stride
# up to 64 divides exactly.
_PROBE = (128, 192)


class CnnLoadError(RuntimeError):
    """The CNN (architecture, weights or stages) could not be loaded; the message says why."""


def stage_key(stride: int) -> str:
    """The Features key of the map at ``stride`` (``s8``)."""
    return f"s{stride}"


def required_features(scorers: Iterable[Any]) -> tuple[tuple[int, ...], bool]:
    """The strides and whether the pooled feature are needed by ``scorers`` together (each
    has ``strides`` and ``uses_pooled``), so one extractor forward serves them all."""
    strides: set[int] = set()
    pooled = False
    for s in scorers:
        strides.update(getattr(s, "strides", ()))
        pooled = pooled or bool(getattr(s, "uses_pooled", False))
    return tuple(sorted(strides)), pooled


@dataclass(frozen=True)
class CnnSpec:
    """What CNN to load and how to feed it. Hashable: it keys per-process caches.

    ``strides`` picks stages by output stride; ``stages`` (node or module names such as
    ``layer2``) overrides them. ``resize_size`` 0 means the papers' ratio 256/224 of
    ``image_size``. ``precision``: what the forward computes in, ``fp32`` or ``bf16`` (the
    module's weights and input in bf16, on a CPU with native bf16; ``module_precision``).
    ``runtime``: ``torch``, or ``openvino`` (the stages compiled by OpenVINO for the CPU,
    ``pipeline.model.compiled``; ``compiled_cache`` is its cache directory, empty for the
    default, and is not part of what the features are).
    """

    backbone: str = DEFAULT_CNN_BACKBONE
    weights: str = DEFAULT_CNN_WEIGHTS
    strides: tuple[int, ...] = (4, 8, 16)
    stages: tuple[str, ...] = ()
    pooled: bool = False
    image_size: int = DEFAULT_IMAGE_SIZE
    resize_size: int = 0
    device: str = "cpu"
    precision: str = FP32
    runtime: str = TORCH
    compiled_cache: str = ""

    def __post_init__(self) -> None:
        if self.precision not in (FP32, BF16):
            raise ValueError(f"a CNN computes in {FP32} or {BF16}, got {self.precision!r}")
        check_runtime(self.runtime, self.device)
        if self.image_size < 1 or self.resize_size < 0:
            raise ValueError(f"bad input size {self.image_size} / resize {self.resize_size}")
        if not self.stages and not self.strides and not self.pooled:
            raise ValueError("ask for at least one stride, stage or the pooled feature")
        if any(s < 1 for s in self.strides):
            raise ValueError(f"strides must be positive, got {self.strides}")

    @property
    def resize(self) -> int:
        return self.resize_size or round(self.image_size * _RESIZE_RATIO)

    @property
    def is_random(self) -> bool:
        return is_random(self.weights)

    @property
    def random_seed(self) -> int:
        return random_seed(self.weights)

    @property
    def channels_last(self) -> bool:
        """Whether the forward runs in the channels-last memory format: in bf16, where oneDNN
        ran it 1.9x (wide_resnet50_2) to 4.8x (mobilenet_v2) the images per CPU-second of
        bf16 NCHW (bench/RESULTS.md, "bf16 on the CPU"); not in fp32, where it ran 1.08x
        (mobilenet_v2) and 0.74x (wide_resnet50_2) and would move fp32 results in their last
        bits (fp32 scores stay bit-identical to earlier runs')."""
        return self.precision == BF16 and self.runtime == TORCH

    @property
    def precision_suffix(self) -> str:
        """``|precision=bf16`` for a bf16 spec, nothing for fp32 (whose identities are those
        of the runs before precision was recorded); ``|runtime=openvino`` for OpenVINO."""
        return (("" if self.precision == FP32 else f"|precision={self.precision}")
                + ("" if self.runtime == TORCH else f"|runtime={self.runtime}"))


@dataclass(frozen=True)
class Stage:
    key: str  # Features key, stage_key(stride)
    node: str  # graph node it reads
    name: str  # the shortest module name whose last node it is (``layer2``)
    stride: int
    channels: int
    grid: tuple[int, int]  # at the spec's image size


@dataclass
class _Graph:
    """Every graph node of the model, in topological order, with what the probe measured."""

    nodes: list[str]
    cut: set[str]
    stride: dict[str, int] = field(default_factory=dict)  # NCHW nodes only
    # the output node of each block → the smallest nesting depth of a block it ends
    blocks: dict[str, int] = field(default_factory=dict)


def _block_names(model: torch.nn.Module) -> dict[str, int]:
    """Modules whose ancestors below ``model`` are all Sequential or ModuleList containers,
    with their depth (1: the model's children)."""
    containers = (torch.nn.Sequential, torch.nn.ModuleList)
    out: dict[str, int] = {}

    def walk(module: torch.nn.Module, prefix: str, depth: int) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            out[full] = depth
            if isinstance(child, containers):
                walk(child, full, depth + 1)

    walk(model, "", 1)
    return out


def _block_outputs(blocks: dict[str, int], nodes: Sequence[str]) -> dict[str, int]:
    """Each block's last graph node (its output: the node named like the block or the last
    one inside it, in topological order) → the smallest depth of a block ending there."""
    last: dict[str, str] = {}
    for node in nodes:
        parts = node.split(".")
        for i in range(1, len(parts) + 1):
            last[".".join(parts[:i])] = node
    out: dict[str, int] = {}
    for name, depth in blocks.items():
        if name in last:
            node = last[name]
            out[node] = min(depth, out.get(node, depth))
    return out


def _load_model(spec: CnnSpec) -> tuple[torch.nn.Module, str, tuple, tuple]:
    """The model in eval mode, a label for its weights, and the mean/std its input needs."""
    import torchvision

    try:
        if spec.backbone not in torchvision.models.list_models(torchvision.models):
            raise CnnLoadError(f"{spec.backbone!r} is not a torchvision classification model")
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        if spec.is_random:
            with seeded(spec.random_seed):
                model = torchvision.models.get_model(spec.backbone, weights=None)
            label = f"{RANDOM_PREFIX}:{spec.random_seed}"
        elif os.path.isfile(spec.weights):
            model = torchvision.models.get_model(spec.backbone, weights=None)
            state = torch.load(spec.weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
            # the file name and checksum, not the folder: the id must not depend on the host
            label = f"{Path(spec.weights).name}#sha256={file_sha256(spec.weights)[:12]}"
        else:
            enum = torchvision.models.get_model_weights(spec.backbone)
            if spec.weights not in enum.__members__:
                raise CnnLoadError(
                    f"{spec.weights!r} is neither a weights file nor one of {spec.backbone}'s "
                    f"torchvision weights {sorted(enum.__members__)} nor random[:SEED]"
                )
            weights = enum[spec.weights]
            model = torchvision.models.get_model(spec.backbone, weights=weights, progress=False)
            label = weights.name  # DEFAULT resolves to the concrete tag
            meta = weights.transforms()
            mean, std = tuple(getattr(meta, "mean", mean)), tuple(getattr(meta, "std", std))
    except CnnLoadError:
        raise
    except Exception as exc:  # torchvision and torch raise many types; give one clear message
        raise CnnLoadError(
            f"could not load CNN {spec.backbone!r} with weights {spec.weights!r}: {exc}. "
            "Named weights come from torchvision's cache ($TORCH_HOME/hub/checkpoints) or a "
            "download; on an offline machine pre-fetch them or pass a state-dict file."
        ) from exc
    return model.eval().requires_grad_(False), label, mean, std


def _probe_graph(model: torch.nn.Module) -> _Graph:
    """Trace the model with every node returned; find its cut vertices and, with one probe
    forward, the stride of every node whose output is a (B, C, H, W) map."""
    from torchvision.models.feature_extraction import (create_feature_extractor,
                                                       get_graph_node_names)

    _, names = get_graph_node_names(model)
    traced = create_feature_extractor(model, return_nodes={n: n for n in names})
    output = next(n for n in traced.graph.nodes if n.op == "output")
    name_of = {node: key for key, node in output.args[0].items()}
    order = [n for n in traced.graph.nodes if n.op != "output"]
    pos = {n: i for i, n in enumerate(order)}
    # A node is a cut vertex iff no edge u→v with pos(u) < pos(node) < pos(v) jumps over it
    # (the edges into the "return everything" output node are not the model's).
    reach = list(range(len(order)))
    for v in order:
        for u in v.all_input_nodes:
            reach[pos[u]] = max(reach[pos[u]], pos[v])
    cut, furthest = set(), -1
    for i, n in enumerate(order):
        if furthest <= i and n in name_of:
            cut.add(name_of[n])
        furthest = max(furthest, reach[i])
    graph = _Graph([name_of[n] for n in order if n in name_of], cut)
    graph.blocks = _block_outputs(_block_names(model), graph.nodes)
    h, w = _PROBE
    with torch.no_grad():
        outs = traced(torch.zeros(1, 3, h, w))
    for key, value in outs.items():
        if torch.is_tensor(value) and value.dim() == 4 and value.shape[2] and value.shape[3]:
            sh, sw = h // value.shape[2], w // value.shape[3]
            if sh == sw and sh * value.shape[2] == h and sw * value.shape[3] == w:
                graph.stride[key] = sh
    return graph


def _module_name(node: str, nodes: Sequence[str]) -> str:
    """The shortest dotted prefix of ``node`` whose last node is ``node`` (``layer2``)."""
    parts = node.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        if [n for n in nodes if n.startswith(prefix + ".")][-1:] == [node]:
            return prefix
    return node


def _resolve_stage(name: str, graph: _Graph) -> str:
    """A node name, or a module name standing for its last node."""
    if name in graph.stride:
        return name
    inside = [n for n in graph.nodes if n.startswith(name + ".")]
    if inside and inside[-1] in graph.stride:
        return inside[-1]
    raise CnnLoadError(f"stage {name!r} is not a node or module with a (B, C, H, W) output")


def _choose_nodes(spec: CnnSpec, graph: _Graph) -> tuple[dict[str, str], str | None]:
    """Features key → node, and the deepest map's node when the pooled feature is asked.

    Named stages (``spec.stages``) take their own strides; every other stride of
    ``spec.strides`` takes the last block output there (the module docstring's rule)."""
    cuts = [n for n in graph.nodes if n in graph.cut and n in graph.stride]
    maps = [n for n in cuts if n in graph.blocks]
    named: dict[str, str] = {}
    for name in spec.stages:
        node = _resolve_stage(name, graph)
        key = stage_key(graph.stride[node])
        if key in named:
            raise CnnLoadError(f"stages {named[key]!r} and {node!r} share stride "
                               f"{graph.stride[node]}")
        named[key] = node
    if spec.strides:
        unused = sorted(k for k in named if int(k[1:]) not in spec.strides)
        if unused:
            raise CnnLoadError(
                f"stage(s) {', '.join(repr(named[k]) for k in unused)} of {spec.backbone} "
                f"are at stride(s) {', '.join(k[1:] for k in unused)}; the scorers read "
                f"strides {', '.join(map(str, spec.strides))}")
    chosen: dict[str, str] = {}
    for s in spec.strides or sorted(int(k[1:]) for k in named):
        key = stage_key(s)
        if key in named:
            chosen[key] = named[key]
            continue
        at = [n for n in maps if graph.stride[n] == s]
        if at:  # the outermost blocks at this stride (a stage, not a layer inside the next)
            depth = min(graph.blocks[n] for n in at)
            at = [n for n in at if graph.blocks[n] == depth]
        else:
            at = [n for n in cuts if graph.stride[n] == s]
            if not at:
                have = sorted({graph.stride[n] for n in cuts})
                raise CnnLoadError(f"{spec.backbone} has no stage at stride {s}; it has {have}")
            LOG.warning("%s has no block output at stride %d; using the node %s (name the "
                        "stage with --cnn-stages to choose another)", spec.backbone, s, at[-1])
        chosen[key] = at[-1]
    deepest = (maps or cuts)[-1] if spec.pooled and cuts else None
    if spec.pooled and deepest is None:
        raise CnnLoadError(f"{spec.backbone} has no feature map to pool")
    return chosen, deepest


@dataclass
class StagedModel:
    """A loaded CNN with its graph measured and its stages chosen (``load_staged``)."""

    model: torch.nn.Module
    weights_label: str
    mean: tuple
    std: tuple
    graph: _Graph
    chosen: dict[str, str]  # Features key → graph node
    deepest: str | None  # the node the pooled feature reads, when asked


def load_staged(spec: CnnSpec) -> StagedModel:
    """Load the model, trace its graph and choose the nodes of ``spec``'s stages."""
    model, label, mean, std = _load_model(spec)
    try:
        graph = _probe_graph(model)
    except CnnLoadError:
        raise
    except Exception as exc:
        raise CnnLoadError(f"could not trace {spec.backbone!r} into a graph: {exc}") from exc
    chosen, deepest = _choose_nodes(spec, graph)
    return StagedModel(model, label, mean, std, graph, chosen, deepest)


class CnnExtractor:
    """A frozen torchvision CNN returning the maps of chosen strides (and the pooled feature).

    identity: backbone, weights, stages, input size and (bf16 only) precision, e.g.
    ``wide_resnet50_2@IMAGENET1K_V1[s4=layer1,s8=layer2,s16=layer3]@256/224``
    stages:   the chosen ``Stage`` per Features key, in stride order

    In bf16 (``spec.precision``) the module's weights and its input are bf16 and the forward
    runs channels-last; the features leave as float32 either way.
    """

    def __init__(self, spec: CnnSpec) -> None:
        from torchvision.models.feature_extraction import create_feature_extractor

        self.spec = spec
        self.device = _resolve_device(spec.device)
        self.dtype = module_dtype(self.device, spec.precision)  # refused before loading
        staged = load_staged(spec)
        model, graph, chosen, deepest = staged.model, staged.graph, staged.chosen, staged.deepest
        self.weights_label, self.mean, self.std = staged.weights_label, staged.mean, staged.std
        returns = {node: key for key, node in chosen.items()}
        if deepest is not None and deepest not in returns:
            returns[deepest] = _DEEPEST
        self._pooled_key = returns.get(deepest) if deepest is not None else None
        self._net = create_feature_extractor(model, return_nodes=returns).to(self.device)
        self._net.eval().requires_grad_(False)
        if spec.runtime == TORCH:
            to_precision(self._net, self.dtype, spec.channels_last)
        else:  # OpenVINO converts the float32 module and computes in the spec's precision
            self.dtype = torch.float32
        size = spec.image_size
        with torch.no_grad():
            probe = self._net(self._input(torch.zeros(1, 3, size, size)))
        self.stages = {
            key: Stage(key, node, _module_name(node, graph.nodes), graph.stride[node],
                       int(probe[key].shape[1]), tuple(probe[key].shape[2:]))
            for key, node in sorted(chosen.items(), key=lambda kv: graph.stride[kv[1]])
        }
        self.pooled_dim = int(probe[self._pooled_key].shape[1]) if self._pooled_key else 0
        stages = ",".join(f"{k}={s.name}" for k, s in self.stages.items())
        stages += (f"{',' if stages else ''}{POOLED}={_module_name(deepest, graph.nodes)}"
                   if deepest is not None else "")
        self.identity = (f"{spec.backbone}@{self.weights_label}[{stages}]"
                         f"@{spec.resize}/{spec.image_size}"
                         + (f"@{spec.precision}" if spec.precision != FP32 else "")
                         + (f"@{spec.runtime}" if spec.runtime != TORCH else ""))
        self._compiled: CompiledModule | None = None
        if spec.runtime == OPENVINO:
            self._compiled = CompiledModule(self._net, (3, size, size), spec.precision,
                                            self.identity, spec.compiled_cache or None)
            self._net = None  # the compiled model replaces the torch one
        LOG.info("CNN extractor %s on %s", self.identity, self.device)

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(s.stride for s in self.stages.values())

    def preprocess(self) -> Callable[[Any], torch.Tensor]:
        """PIL image → (3, image_size, image_size): resize, center crop, ImageNet mean/std."""
        return _transform(self.spec, self.mean, self.std)

    def _input(self, pixels: torch.Tensor) -> torch.Tensor:
        return to_input(pixels, self.device, self.dtype, self.spec.channels_last)

    def extract(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) → {stage key: (B, C, h, w), "pooled": (B, C)} on the device, float32
        and contiguous whatever the forward computed in."""
        if self._compiled is not None:
            out = self._compiled(pixels)
        else:
            with torch.no_grad():
                out = self._net(self._input(pixels))
        feats = {key: out[key].float().contiguous() for key in self.stages}
        if self._pooled_key is not None:
            feats[POOLED] = out[self._pooled_key].float().mean(dim=(2, 3))
        return feats


def _rgb(image: Any) -> Any:
    return image.convert("RGB")


def _transform(spec: CnnSpec, mean: Sequence[float],
               std: Sequence[float]) -> Callable[[Any], torch.Tensor]:
    from torchvision import transforms as T

    return host_normalizing(T.Compose([
        T.Lambda(_rgb),
        T.Resize(spec.resize, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.CenterCrop(spec.image_size),
        T.ToTensor(),
        T.Normalize(tuple(mean), tuple(std)),
    ]))


def cnn_preprocess(spec: CnnSpec) -> Callable[[Any], torch.Tensor]:
    """The extractor's ``preprocess()`` without loading the model: named torchvision weights
    say their normalisation in their metadata; files and random weights use ImageNet's."""
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if not spec.is_random and not os.path.isfile(spec.weights):
        import torchvision

        try:
            meta = torchvision.models.get_model_weights(spec.backbone)[spec.weights].transforms()
        except (KeyError, ValueError) as exc:
            raise CnnLoadError(f"{spec.weights!r} is neither a weights file nor a torchvision "
                               f"weights name of {spec.backbone!r} nor random[:SEED]") from exc
        mean, std = getattr(meta, "mean", mean), getattr(meta, "std", std)
    return _transform(spec, mean, std)


def _resolve_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CnnLoadError(f"device {device!r} was asked for, but CUDA is not available here")
    return dev


def build_cnn_extractor(name: str = DEFAULT_CNN_BACKBONE, weights: str = DEFAULT_CNN_WEIGHTS,
                        device: str = "cpu", strides: Sequence[int] = (4, 8, 16),
                        image_size: int = DEFAULT_IMAGE_SIZE, *, pooled: bool = False,
                        stages: Sequence[str] = (), resize_size: int = 0,
                        precision: str = FP32) -> CnnExtractor:
    """Load ``name`` (a torchvision model builder) with ``weights`` as a frozen extractor of
    the maps at ``strides`` (or the named ``stages``) and, with ``pooled``, the pooled
    deepest feature. See ``required_features`` for what a set of scorers needs."""
    return CnnExtractor(CnnSpec(name, weights, tuple(strides), tuple(stages), pooled,
                                image_size, resize_size, device, precision))


def get_cnn_extractor(spec: CnnSpec) -> CnnExtractor:
    """One extractor per spec per process: the model is loaded once and shared."""
    return shared("cnn", spec, lambda: CnnExtractor(spec))


# --------------------------------------------------------------- the extractor entry

CNN = "cnn"


class CnnEntry(ExtractorEntry):
    """A torchvision CNN for SPADE, PaDiM and PatchCore: one forward returns every stride
    its readers ask for (``requirements``: ``strides``, ``pooled``), and the pooled feature
    when references are chosen by their descriptors."""

    name = CNN
    view = CNN
    options = (
        Option("cnn_backbone", DEFAULT_CNN_BACKBONE,
               "spade/padim/patchcore: torchvision model builder name (default %(default)s; "
               "each stage is the output of the last block at its stride, so ResNets, "
               "mobilenet_v2 and efficientnet work)"),
        Option("cnn_weights", DEFAULT_CNN_WEIGHTS,
               "torchvision weights name (fetched into $TORCH_HOME), a state-dict file or "
               "'random[:SEED]' (default %(default)s)"),
        Option("cnn_stages", (), "comma-separated module or node names of the CNN "
               "(layer2,layer3; features.6,features.13): each replaces the automatic stage "
               "at its own stride", type=name_list, metavar="NAMES"),
        Option("cnn_runtime", TORCH, "spade/padim/patchcore: what runs the CNN on the CPU: "
               "torch, or openvino (compiled by OpenVINO, at --precision; optional package "
               "'openvino'; faster on the CPUs measured, not bit-identical to torch; "
               "default %(default)s)", choices=RUNTIMES),
        Option("compiled_cache", "", "directory of the compiled models --cnn-runtime "
               f"openvino keeps, on the worker's local disk (default ${CACHE_ENV}, else "
               "~/.cache/inctrl/compiled)", metavar="DIR"),
    )

    def spec(self, models: Models, needs: Sequence[Mapping[str, Any]]) -> CnnSpec:
        strides: set[int] = set()
        pooled = models.descriptors
        for need in needs:
            strides.update(need.get("strides", ()))
            pooled = pooled or bool(need.get("pooled", False))
        return CnnSpec(models.setting("cnn_backbone"), models.setting("cnn_weights"),
                       strides=tuple(sorted(strides)), stages=models.setting("cnn_stages"),
                       pooled=pooled, device=models.device,
                       precision=module_precision(models.device, models.precision),
                       runtime=models.setting("cnn_runtime"),
                       compiled_cache=models.setting("compiled_cache"))

    def preprocess(self, spec: CnnSpec) -> Callable[[Any], torch.Tensor]:
        return cnn_preprocess(spec)

    def identity(self, spec: CnnSpec) -> str:
        return (f"cnn|{spec.backbone}|{weights_label(spec.weights)}|{spec.strides}"
                f"|pooled={spec.pooled}|{spec.resize}/{spec.image_size}"
                + (f"|stages={spec.stages}" if spec.stages else "") + spec.precision_suffix)

    def load(self, spec: CnnSpec) -> CnnExtractor:
        return get_cnn_extractor(spec)

    def geometry(self, spec: CnnSpec, grid: tuple[int, int]) -> InputGeometry:
        return InputGeometry.center_crop(spec.resize, spec.image_size)

    def descriptor(self, features: Features) -> torch.Tensor:
        """The pooled deepest map (what the classifier reads), else the spatial mean of the
        deepest map there is."""
        if POOLED in features:
            return features[POOLED]
        deepest = max((k for k in features if k.startswith("s") and k[1:].isdigit()),
                      key=lambda k: int(k[1:]))
        return features[deepest].mean(dim=(2, 3))

    def model_of(self, spec: CnnSpec) -> tuple[str, str]:
        return spec.backbone, weights_label(spec.weights)


CNN_ENTRY = CnnEntry()
