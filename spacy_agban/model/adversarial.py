"""Adversarial learning between modalities (paper eq. 8, 24-25)."""
import math
from typing import Any, Tuple

import torch
from torch import nn
from torch.nn import functional as F

TEXT_LABEL = 0.0
VISUAL_LABEL = 1.0


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor, None]:
        return -ctx.lam * grad, None


class GradientReversal(nn.Module):
    """Identity forward, -lambda * gradient backward (eq. 24-25)."""

    def __init__(self, lam: float = 1.0):
        super().__init__()
        self.lam = lam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReverseGrad.apply(x, self.lam)


class ModalityDiscriminator(nn.Module):
    """3-layer feed-forward classifier: is a d-dim feature from text or image?"""

    def __init__(self, width: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(width, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits of P(visual) for each row of ``features`` (n, d) -> (n,)."""
        return self.layers(features).squeeze(-1)


REDUCTIONS = ("mean", "sum")


def adversarial_loss(
    discriminator: ModalityDiscriminator,
    text_features: torch.Tensor,
    visual_features: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    """Eq. 8: the discriminator's cross-entropy on both modalities.

    "mean": each modality's mean, weighted equally (tokens far outnumber units).
    "sum": summed over every token and unit, on the scale of the CRF loss (which
    sums over the batch), so the reversed gradient is not drowned out by it.
    Inputs are the *real* (unpadded) rows only. Zero when either side is empty:
    with one modality there is nothing to tell apart.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"adversarial reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if text_features.shape[0] == 0 or visual_features.shape[0] == 0:
        return text_features.new_zeros(())
    text_logits = discriminator(text_features)
    visual_logits = discriminator(visual_features)
    text_loss = F.binary_cross_entropy_with_logits(
        text_logits, torch.full_like(text_logits, TEXT_LABEL), reduction=reduction
    )
    visual_loss = F.binary_cross_entropy_with_logits(
        visual_logits, torch.full_like(visual_logits, VISUAL_LABEL), reduction=reduction
    )
    if reduction == "sum":
        return text_loss + visual_loss
    return 0.5 * (text_loss + visual_loss)


def dann_lambda(max_lambda: float, step: int, warmup_steps: int) -> float:
    """The GRL weight at a training step: DANN's schedule rising from 0 to max_lambda.

    lambda_p = max_lambda * (2 / (1 + exp(-10 p)) - 1), p = step / warmup_steps
    (Ganin et al. 2016), so the projectors are not pushed by a discriminator that
    has not learned anything yet. ``warmup_steps = 0``: max_lambda throughout.
    """
    if warmup_steps <= 0:
        return max_lambda
    progress = min(1.0, step / warmup_steps)
    return max_lambda * (2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0)
