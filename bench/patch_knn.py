"""A minimal patch nearest-neighbour detector, written from the PatchCore paper's equations
(Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022, Sec. 3.1),
independently of ``pipeline.model.scorers``: the yardstick ``bench.quality`` holds the
job's PatchCore against.

- Features: two mid-level stages of an ImageNet CNN, named here explicitly per backbone (the
  paper: WRN-50's layer2 and layer3; for MobileNetV2 the outputs of the last blocks at
  strides 8 and 16, ``features.6`` and ``features.13``).
- Local patch features (Eq. 2–3): every position's 3×3 neighbourhood averaged (adaptive
  average pooling over the neighbourhood; outside the map counts as zero, as the official
  code's zero-padded unfold does); the stride-16 map bilinearly upsampled to the stride-8
  grid; both concatenated along channels.
- Memory: every patch of the k references (no coreset).
- Score (Eq. 6): a query's largest distance from a patch to its nearest memory patch,
  Euclidean, without the Eq. 7 reweighting.

Input: resize the shorter side to 256 (bilinear), center-crop 224, ImageNet mean and std.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

#: The two stages (stride 8, stride 16) per torchvision backbone.
STAGES = {"mobilenet_v2": ("features.6", "features.13"),
          "resnet18": ("layer2", "layer3"), "wide_resnet50_2": ("layer2", "layer3")}


def nearest(patches: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """(n, C), (m, C) → (n,) each patch's Euclidean distance to its nearest bank patch, from
    the differences themselves (no ‖a‖² − 2ab + ‖b‖² cancellation)."""
    return torch.cat([torch.cdist(patches[i:i + 256], bank,
                                  compute_mode="donot_use_mm_for_euclid_dist").amin(1)
                      for i in range(0, patches.shape[0], 256)])


def local_patches(fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """(N, C8, h, w), (N, C16, h', w') stage maps → (N, h·w, C8 + C16): each map's zero-padded
    3×3 mean, the coarse one bilinearly resized to the fine grid, the channels concatenated."""
    fine, coarse = (F.avg_pool2d(m, 3, stride=1, padding=1) for m in (fine, coarse))
    coarse = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)
    return torch.cat([fine, coarse], 1).flatten(2).transpose(1, 2)


class PatchKnn:
    """Load ``backbone`` with a state-dict file; score queries against references."""

    def __init__(self, backbone: str, weights_file: str, image_size: int = 224) -> None:
        import torchvision
        from torchvision import transforms as T
        from torchvision.models.feature_extraction import create_feature_extractor

        if backbone not in STAGES:
            raise ValueError(f"no stages known for {backbone!r}; known: {sorted(STAGES)}")
        model = torchvision.models.get_model(backbone, weights=None)
        model.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
        self.net = create_feature_extractor(model.eval(), return_nodes=list(STAGES[backbone]))
        self.stages = STAGES[backbone]
        self.transform = T.Compose([
            T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size), T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    @torch.no_grad()
    def maps(self, images: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        """PIL images → the two stages' maps, (N, C8, h, w) and (N, C16, h/2, w/2)."""
        out = self.net(torch.stack([self.transform(im.convert("RGB")) for im in images]))
        fine, coarse = (out[s] for s in self.stages)
        return fine, coarse

    def patches(self, images: Sequence) -> torch.Tensor:
        """PIL images → (N, h·w, C8 + C16) local patch features on the stride-8 grid."""
        return local_patches(*self.maps(images))

    def scores(self, references: Sequence, queries: Sequence) -> list[float]:
        """Each query's largest nearest-reference-patch distance."""
        bank = self.patches(references).flatten(0, 1)  # (k·h·w, C)
        out = []
        for q in self.patches(queries):  # (h·w, C)
            out.append(float(nearest(q, bank).amax()))
        return out
