"""SimCLR: a projection head on the backbone, and the NT-Xent loss over two views (Chen et al. 2020)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from medvision.models.heads import feature_width
from medvision.runtime import Dist, all_gather_tensor


class SimCLR(nn.Module):
    """The backbone (a timm model without classifier) and a two-layer projection head on its features.

    Only the backbone is kept after pretraining: the head's output is shaped by the loss's
    invariances and transfers worse than the features before it (Chen et al. 2020, section 4.2).
    """

    def __init__(self, backbone: nn.Module, hidden: int, out: int) -> None:
        super().__init__()
        self.backbone = backbone
        width = feature_width(backbone)
        self.projector = nn.Sequential(
            nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


def nt_xent(z: torch.Tensor, temperature: float, d: Dist) -> torch.Tensor:
    """Per-sample NT-Xent losses (B,) of this rank's embeddings ``z`` (2B, D), views interleaved (a0 a1 b0 b1 ...).

    Each view's positive is its partner and its negatives are every other view of the global batch:
    on several ranks the embeddings are all-gathered with gradients (``torch.distributed.nn``), so
    the contrast is over the whole global batch, as on one process. A sample's loss is the mean of
    its two views' cross-entropies.
    """
    z = F.normalize(z.float(), dim=1)
    offset = 0
    everything = z
    if d.enabled:
        sizes = all_gather_tensor(torch.tensor([z.shape[0]], device=z.device), d).flatten().tolist()
        widest = max(sizes)
        padded = F.pad(z, (0, 0, 0, widest - z.shape[0]))
        from torch.distributed.nn.functional import all_gather

        parts = all_gather(padded)
        everything = torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])
        offset = sum(sizes[: dist.get_rank()])
    logits = z @ everything.T / temperature
    rows = torch.arange(z.shape[0], device=z.device)
    itself = torch.zeros_like(logits, dtype=torch.bool)
    itself[rows, rows + offset] = True
    logits = logits.masked_fill(itself, float("-inf"))  # a view is not its own negative
    partner = (rows ^ 1) + offset
    per_view = F.cross_entropy(logits, partner, reduction="none")
    return per_view.view(-1, 2).mean(dim=1)


def simclr_criterion(temperature: float, d: Dist, channels_last: bool) -> Any:
    """The :data:`medvision.training.loop.Criterion` of SimCLR: batches of (B, 2, C, H, W) views, labels ignored."""

    def loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = images.flatten(0, 1)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return nt_xent(model(x), temperature, d)

    return loss
