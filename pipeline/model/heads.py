"""InCTRL's small trained modules: the embedding adapter and two scoring heads."""
from __future__ import annotations

import torch
from torch import nn

HIDDEN = (128, 64)
ADAPTER_REDUCTION = 4


class Adapter(nn.Module):
    """Linear(d, d/4) → ReLU → Linear(d/4, d) → ReLU, both without bias: (batch, d) → (batch, d)."""

    def __init__(self, dim: int, reduction: int = ADAPTER_REDUCTION) -> None:
        super().__init__()
        if dim % reduction:
            raise ValueError(f"embedding width {dim} is not divisible by {reduction}")
        self.down = nn.Linear(dim, dim // reduction, bias=False)
        self.up = nn.Linear(dim // reduction, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.up(torch.relu(self.down(x))))


class ScoreHead(nn.Module):
    """Linear(n,128) → ReLU → BN → Linear(128,64) → ReLU → BN → Linear(64,1) → sigmoid.

    (batch, n) → (batch,) probabilities. ``logits`` gives the pre-sigmoid values.
    """

    def __init__(self, dim_in: int) -> None:
        super().__init__()
        h1, h2 = HIDDEN
        self.fc1 = nn.Linear(dim_in, h1)
        self.bn1 = nn.BatchNorm1d(h1)
        self.fc2 = nn.Linear(h1, h2)
        self.bn2 = nn.BatchNorm1d(h2)
        self.fc3 = nn.Linear(h2, 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(torch.relu(self.fc1(x)))
        x = self.bn2(torch.relu(self.fc2(x)))
        return self.fc3(x).squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


class InCTRLHeads(nn.Module):
    """Adapter plus the image-residual head (n = embed_dim) and holistic head (n = patches)."""

    def __init__(self, embed_dim: int, num_patches: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_patches = num_patches
        self.adapter = Adapter(embed_dim)
        self.image_head = ScoreHead(embed_dim)
        self.holistic_head = ScoreHead(num_patches)

    @classmethod
    def seeded(cls, embed_dim: int, num_patches: int, seed: int) -> "InCTRLHeads":
        """Freshly initialised heads, identical for the same seed."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(embed_dim, num_patches)
