"""Fusion of token features with visual units (paper eq. 9-14 and the Concat baseline)."""
from typing import Optional, Tuple

import torch
from torch import nn


def masked_mean(units: torch.Tensor, unit_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real units of each doc (B, K, d) -> (B, d); zero when none."""
    weights = unit_mask.to(units.dtype).unsqueeze(-1)
    total = (units * weights).sum(dim=1)
    count = weights.sum(dim=1).clamp(min=1.0)
    return total / count


class ConcatFusion(nn.Module):
    """Object-Concat (Table III): each token gets the mean visual unit appended."""

    def __init__(self, width: int):
        super().__init__()
        self.output = nn.Linear(2 * width, width)

    def forward(
        self, tokens: torch.Tensor, units: torch.Tensor, unit_mask: torch.Tensor
    ) -> torch.Tensor:
        pooled = masked_mean(units, unit_mask).unsqueeze(1).expand_as(tokens)
        return self.output(torch.cat([tokens, pooled], dim=-1))


class GatedBilinearAttention(nn.Module):
    """Bilinear attention of tokens over visual units, with an optional gate.

    ``gated=False`` is Object-BAN of Table III; ``gated=True`` is Object-GBAN.
    """

    def __init__(self, width: int, rank: int, gate_width: int, gated: bool = True):
        super().__init__()
        self.token_proj = nn.Linear(width, rank)
        self.unit_proj = nn.Linear(width, rank)
        self.score = nn.Linear(rank, 1, bias=False)
        self.gated = gated
        if gated:
            self.gate_hidden = nn.Linear(2 * width, gate_width)
            self.gate_out = nn.Linear(gate_width, width)

    def attention(
        self, tokens: torch.Tensor, units: torch.Tensor, unit_mask: torch.Tensor
    ) -> torch.Tensor:
        """Attention weights (B, T, K): rows sum to one over real units, zero if none."""
        t = torch.relu(self.token_proj(tokens))  # (B, T, r)
        v = torch.relu(self.unit_proj(units))  # (B, K, r)
        # eq. 9: A_ij = p^T (relu(U t_i) * relu(V v_j)), low-rank bilinear
        scores = torch.einsum("btr,bkr,r->btk", t, v, self.score.weight[0])
        mask = unit_mask.unsqueeze(1)  # (B, 1, K)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1)
        # docs with no units: the uniform weights over padding are zeroed here
        return weights * mask.to(weights.dtype)

    def forward(
        self, tokens: torch.Tensor, units: torch.Tensor, unit_mask: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Return (G_M, attention, gate). ``gate`` is None when ungated."""
        weights = self.attention(tokens, units, unit_mask)
        attended = torch.bmm(weights, units)  # eq. 10: v_i = sum_j a_ij v_j
        if not self.gated:
            return attended + tokens, weights, None
        # eq. 11-13: a sigmoid gate from the token and its attended visual feature
        hidden = torch.tanh(self.gate_hidden(torch.cat([tokens, attended], dim=-1)))
        gate = torch.sigmoid(self.gate_out(hidden))
        return gate * attended + tokens, weights, gate  # eq. 14
