"""CRF output layer over BIO tags (paper eq. 16-21), on pytorch-crf."""
from typing import List

import torch
from torch import nn
from torchcrf import CRF


class CRFOutput(nn.Module):
    """Emission scores + a linear-chain CRF.

    pytorch-crf needs the first timestep unmasked, so callers never pass empty docs
    (the pipe leaves them out); the mask is a contiguous end-padding bool mask.
    """

    def __init__(self, width: int, n_tags: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.emissions = nn.Linear(width, n_tags)
        self.crf = CRF(n_tags, batch_first=True)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        return self.emissions(self.dropout(features))

    def loss(self, features: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood (eq. 19), summed over the docs of the batch."""
        log_likelihood = self.crf(self.scores(features), tags, mask=mask, reduction="sum")
        return -log_likelihood

    def decode(self, features: torch.Tensor, mask: torch.Tensor) -> List[List[int]]:
        """Viterbi decoding (eq. 21)."""
        return self.crf.decode(self.scores(features), mask=mask)
