"""InCTRL model core: a frozen open_clip backbone, pure residual math and small trained heads.

Nothing in this package imports Apache Beam; the Beam transforms in ``transforms/`` wrap it.
"""
from pipeline.model.backbone import (
    DEFAULT_BACKBONE,
    DEFAULT_PRETRAINED,
    TINY_BACKBONE,
    TINY_PRETRAINED,
    BackboneLoadError,
    BackboneSpec,
    ClipBackbone,
    Geometry,
    ImageFeatures,
)
from pipeline.model.checkpoint import (
    CheckpointError,
    HeadsMetadata,
    import_official_checkpoint,
    load_heads,
    save_heads,
)
from pipeline.model.heads import Adapter, InCTRLHeads, ScoreHead
from pipeline.model.inctrl import InCTRLModel, ReferenceSet, ScoreComponents

__all__ = [
    "DEFAULT_BACKBONE",
    "DEFAULT_PRETRAINED",
    "TINY_BACKBONE",
    "TINY_PRETRAINED",
    "Adapter",
    "BackboneLoadError",
    "BackboneSpec",
    "CheckpointError",
    "ClipBackbone",
    "Geometry",
    "HeadsMetadata",
    "ImageFeatures",
    "InCTRLHeads",
    "InCTRLModel",
    "ReferenceSet",
    "ScoreComponents",
    "ScoreHead",
    "import_official_checkpoint",
    "load_heads",
    "save_heads",
]
