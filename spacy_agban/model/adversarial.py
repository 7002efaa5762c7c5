"""Adversarial learning between modalities (paper eq. 8, 24-25)."""
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


def adversarial_loss(
    discriminator: ModalityDiscriminator,
    text_features: torch.Tensor,
    visual_features: torch.Tensor,
) -> torch.Tensor:
    """Eq. 8: the discriminator's cross-entropy on both modalities.

    Each modality's mean is weighted equally (tokens far outnumber units). Inputs
    are the *real* (unpadded) rows only. Zero when either side is empty: with one
    modality there is nothing to tell apart.
    """
    if text_features.shape[0] == 0 or visual_features.shape[0] == 0:
        return text_features.new_zeros(())
    text_logits = discriminator(text_features)
    visual_logits = discriminator(visual_features)
    text_loss = F.binary_cross_entropy_with_logits(
        text_logits, torch.full_like(text_logits, TEXT_LABEL)
    )
    visual_loss = F.binary_cross_entropy_with_logits(
        visual_logits, torch.full_like(visual_logits, VISUAL_LABEL)
    )
    return 0.5 * (text_loss + visual_loss)
