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
        """Viterbi decoding (eq. 21), batched (same result as ``self.crf.decode``)."""
        crf = self.crf
        return viterbi_decode(
            self.scores(features), mask, crf.start_transitions, crf.transitions, crf.end_transitions
        )


@torch.no_grad()
def viterbi_decode(
    emissions: torch.Tensor,
    mask: torch.Tensor,
    start: torch.Tensor,
    transitions: torch.Tensor,
    end: torch.Tensor,
) -> List[List[int]]:
    """Best tag sequence per doc (eq. 21), the whole batch at once.

    emissions (B, T, K), mask (B, T) contiguous from the start with mask[:, 0] true;
    transitions[i, j] scores tag i followed by tag j. pytorch-crf's decode backtracks
    doc by doc with one ``.item()`` per token; here each step is one tensor op over
    the batch, and ties go the same way (``max`` over the previous tag).
    """
    batch, length, _ = emissions.shape
    mask = mask.bool()
    score = start + emissions[:, 0]  # (B, K): best path ending in each tag
    history = []
    for t in range(1, length):
        step, best_previous = (score.unsqueeze(2) + transitions + emissions[:, t].unsqueeze(1)).max(dim=1)
        score = torch.where(mask[:, t].unsqueeze(1), step, score)
        history.append(best_previous)
    last = mask.sum(dim=1) - 1  # index of each doc's last token
    best_last = (score + end).max(dim=1)[1]
    tags = torch.zeros((batch, length), dtype=torch.long, device=emissions.device)
    current = best_last
    for t in range(length - 1, -1, -1):
        if t < length - 1:
            previous = history[t].gather(1, current.unsqueeze(1)).squeeze(1)
            current = torch.where(t == last, best_last, previous)
        tags[:, t] = current
    return [row[: n + 1] for row, n in zip(tags.tolist(), last.tolist())]
