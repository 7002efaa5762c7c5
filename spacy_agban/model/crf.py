"""CRF output layer over BIO tags (paper eq. 16-21), on pytorch-crf."""
import functools
from typing import List, Optional, Tuple

import numpy

import torch
from torch import nn
from torchcrf import CRF

from .reference import use_reference
from .tags import OUTSIDE_TAG, entity_spans



@functools.lru_cache(maxsize=8)
def bio_penalties(n_tags: int) -> "tuple[numpy.ndarray, numpy.ndarray]":
    """Additive (start (K,), transitions (K, K)) scores that rule out invalid BIO
    sequences for the tag layout ``O, B-L1, I-L1, B-L2, I-L2, ...``: an I- tag only
    after the B- or I- of its own label, never first. The CRF learns to avoid them but
    not always (about one post in a hundred on the Twitter-2015 dev split); spaCy
    would read such a stray I- as an entity of its own. Cached: callers add, never
    write into them."""
    floor = numpy.float32(numpy.finfo(numpy.float32).min / 4)
    start = numpy.zeros(n_tags, dtype=numpy.float32)
    transitions = numpy.zeros((n_tags, n_tags), dtype=numpy.float32)
    for inside in range(OUTSIDE_TAG + 2, n_tags, 2):
        start[inside] = floor
        transitions[:, inside] = floor
        transitions[inside - 1:inside + 1, inside] = 0.0  # from B- and I- of the same label
    return start, transitions


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
        # decoding only (not weights, not saved): the pipe sets them from its config
        self.bio_constraints = False
        self.min_confidence = 0.0
        self.store_confidence = False  # decode_scored also returns each entity's confidence
        self.store_marginals = False  # AGBANModule's decoding forward also returns the tag marginals

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        return self.emissions(self.dropout(features))

    def loss(self, features: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood (eq. 19), summed over the docs of the batch."""
        return self.nll(self.scores(features), tags, mask)

    def nll(self, scores: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of given emission scores, summed over the docs."""
        return -self.crf(scores, tags, mask=mask, reduction="sum")

    def log_marginals(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-token log P(y_t = k | x) (B, T, K) of given emission scores."""
        crf = self.crf
        return crf_log_marginals(scores, mask, crf.start_transitions, crf.transitions, crf.end_transitions)

    def decode(
        self, features: torch.Tensor, mask: torch.Tensor, outside_only: Optional[torch.Tensor] = None
    ) -> List[List[int]]:
        """The tags of :meth:`decode_scored`."""
        return self.decode_scored(features, mask, outside_only)[0]

    def decode_scored(
        self, features: torch.Tensor, mask: torch.Tensor, outside_only: Optional[torch.Tensor] = None
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Viterbi decoding (eq. 21), batched (same result as ``self.crf.decode``), and
        with ``store_confidence`` on, each entity's confidence (:func:`entity_confidences`,
        per doc in the order of :func:`~.tags.entity_spans`; else None).

        ``outside_only`` (B, T) bool marks tokens that may only take the O tag
        (whitespace: spaCy never puts an entity on it); the constraint is part of the
        search, so an entity around such a token is re-decoded, never cut afterwards.
        With ``bio_constraints`` on, the search also skips invalid BIO sequences
        (:func:`bio_penalties`). With ``min_confidence`` above 0, an entity of the best
        sequence whose least sure token has a marginal probability of its decoded tag
        below it is tagged O (:func:`drop_unsure_entities`).
        """
        scores = self.scores(features)
        crf = self.crf
        start, transitions, end = crf.start_transitions, crf.transitions, crf.end_transitions
        if self.bio_constraints:
            start_penalty, transition_penalty = (
                torch.from_numpy(p).to(device=scores.device, dtype=scores.dtype)
                for p in bio_penalties(len(start))
            )
            start, transitions = start + start_penalty, transitions + transition_penalty
        if outside_only is not None and bool(outside_only.any()):
            forbidden = torch.zeros_like(scores, dtype=torch.bool)
            forbidden[..., OUTSIDE_TAG + 1:] = outside_only.unsqueeze(-1)
            scores = scores.masked_fill(forbidden, torch.finfo(scores.dtype).min / 4)
        numpy_path = scores.device.type == "cpu" and scores.dtype == torch.float32 and not use_reference()
        if numpy_path:
            # numpy: the same float32 sums and first-max ties, without torch's per-op cost
            # (a tweet is ~20 steps of 9 x 9 tags, where that cost is most of the time)
            arrays = [x.detach().numpy() for x in (scores, mask, start, transitions, end)]
            tags = viterbi_decode_numpy(*arrays)
        else:
            tags = viterbi_decode(scores, mask, start, transitions, end)
        if self.min_confidence <= 0 and not self.store_confidence:
            return tags, None
        if numpy_path:  # ~10x cheaper than the torch loop on CPU, as for Viterbi
            marginals = crf_marginals_numpy(*arrays)
        else:
            with torch.no_grad():  # in float32: float16 sums are ~0.01 off, enough to flip a close entity
                marginals = crf_log_marginals(
                    scores.float(), mask, start.float(), transitions.float(), end.float()
                ).exp().cpu().numpy()
        if self.min_confidence > 0:
            tags = drop_unsure_entities(tags, marginals, self.min_confidence)
        # the same marginals and the same reading of entities as the threshold, so a kept
        # entity's confidence is >= min_confidence and a dropped one's was below it
        return tags, entity_confidences(tags, marginals) if self.store_confidence else None


def entity_confidences(tags: List[List[int]], marginals: numpy.ndarray) -> List[List[float]]:
    """Each entity's confidence, per doc in the order of :func:`~.tags.entity_spans`:
    the smallest marginal probability, over its tokens, of the tag each was decoded
    with (marginals (B, T, K) from :func:`crf_log_marginals`)."""
    return [
        [float(min(probs[t, row[t]] for t in range(start, end))) for start, end, _ in entity_spans(row)]
        for row, probs in zip(tags, marginals)
    ]


def drop_unsure_entities(tags: List[List[int]], marginals: numpy.ndarray, min_confidence: float) -> List[List[int]]:
    """The tag sequences with every entity whose least sure token is below
    ``min_confidence`` tagged O.

    Entities are read by :func:`~.tags.entity_spans`, as the pipe reads them; an entity's
    confidence is the smallest marginal probability, over its tokens, of the tag
    each was decoded with (marginals (B, T, K) from :func:`crf_log_marginals`). The
    Viterbi sequence is the most probable as a whole, but a token of it can still
    be more likely another tag: where that is so the entity is a guess, and dropping
    such guesses trades recall for precision (chosen on dev, see the pipe's config).
    Dropping a whole entity leaves a valid BIO sequence.
    """
    result = []
    for row, confidences in zip(tags, entity_confidences(tags, marginals)):
        row = list(row)
        for (start, end, _), confidence in zip(entity_spans(row), confidences):
            if confidence < min_confidence:
                row[start:end] = [OUTSIDE_TAG] * (end - start)
        result.append(row)
    return result


def crf_log_marginals(
    emissions: torch.Tensor,
    mask: torch.Tensor,
    start: torch.Tensor,
    transitions: torch.Tensor,
    end: torch.Tensor,
) -> torch.Tensor:
    """Log tag marginals of a linear-chain CRF, by forward-backward in log space.

    emissions (B, T, K), mask (B, T) contiguous from the start with mask[:, 0] true;
    returns (B, T, K) log-probabilities whose exp sums to one over K on every real
    token (rows of padding positions are meaningless). Differentiable: pytorch-crf
    gives only the likelihood and Viterbi, not marginals.
    """
    batch, length, _ = emissions.shape
    mask = mask.bool()
    alphas = [start + emissions[:, 0]]  # log-sum of paths ending in each tag at t
    for t in range(1, length):
        step = torch.logsumexp(alphas[-1].unsqueeze(2) + transitions, dim=1) + emissions[:, t]
        alphas.append(torch.where(mask[:, t].unsqueeze(1), step, alphas[-1]))
    log_z = torch.logsumexp(alphas[-1] + end, dim=1)  # padding carries the last alpha over
    betas = [end.expand(batch, -1)]  # log-sum of path continuations from each tag at t
    for t in range(length - 2, -1, -1):
        nxt = (emissions[:, t + 1] + betas[0]).unsqueeze(1)  # (B, 1, K_next)
        step = torch.logsumexp(transitions + nxt, dim=2)
        betas.insert(0, torch.where(mask[:, t + 1].unsqueeze(1), step, end.expand(batch, -1)))
    return torch.stack(alphas, dim=1) + torch.stack(betas, dim=1) - log_z[:, None, None]


def crf_marginals_numpy(
    emissions: numpy.ndarray,
    mask: numpy.ndarray,
    start: numpy.ndarray,
    transitions: numpy.ndarray,
    end: numpy.ndarray,
) -> numpy.ndarray:
    """:func:`crf_log_marginals` (exponentiated) in numpy, for prediction on CPU.

    Forward-backward in probability space, each step rescaled to sum to one (the
    scale cancels in the marginals), in float64: one matrix product per step where
    the log-space loop needs a logsumexp over (B, K, K). Scores are shifted by their
    maximum before ``exp`` (per token for the emissions), which cancels too; a score
    at the ``bio_penalties`` floor becomes an exact 0. Returns float32.
    """
    weights = numpy.asarray(emissions, dtype=numpy.float64)
    batch, length, n_tags = weights.shape
    weights = numpy.exp(weights - weights.max(axis=2, keepdims=True))
    mask = numpy.asarray(mask, dtype=bool)
    trans = numpy.exp(transitions.astype(numpy.float64) - transitions.max())
    alphas = numpy.empty((batch, length, n_tags))
    alpha = numpy.exp(start.astype(numpy.float64) - start.max()) * weights[:, 0]
    alphas[:, 0] = alpha = alpha / alpha.sum(axis=1, keepdims=True)
    for t in range(1, length):
        step = (alpha @ trans) * weights[:, t]
        step /= step.sum(axis=1, keepdims=True)
        alphas[:, t] = alpha = numpy.where(mask[:, t, None], step, alpha)
    final = numpy.exp(end.astype(numpy.float64) - end.max())
    final /= final.sum()
    betas = numpy.empty((batch, length, n_tags))
    betas[:, length - 1] = beta = numpy.broadcast_to(final, (batch, n_tags))
    for t in range(length - 2, -1, -1):
        step = (weights[:, t + 1] * beta) @ trans.T
        step /= step.sum(axis=1, keepdims=True)
        betas[:, t] = beta = numpy.where(mask[:, t + 1, None], step, final)  # the doc's last token: end
    marginals = alphas * betas
    # float32, as the torch path's: the confidences stored (float32, as spancat's scores)
    # are then exactly the values min_confidence was compared with
    return (marginals / marginals.sum(axis=2, keepdims=True)).astype(numpy.float32)


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


def viterbi_decode_numpy(
    emissions: numpy.ndarray,
    mask: numpy.ndarray,
    start: numpy.ndarray,
    transitions: numpy.ndarray,
    end: numpy.ndarray,
    outside_only: Optional[numpy.ndarray] = None,
) -> List[List[int]]:
    """:func:`viterbi_decode` in numpy, with the ``outside_only`` constraint of
    :meth:`CRFOutput.decode`: the same sums in the same order, so the same tags."""
    emissions = numpy.asarray(emissions, dtype=numpy.float32)
    if outside_only is not None and outside_only.any():
        emissions = emissions.copy()
        floor = numpy.float32(numpy.finfo(numpy.float32).min / 4)
        emissions[..., OUTSIDE_TAG + 1:][outside_only.astype(bool)] = floor
    batch, length, _ = emissions.shape
    mask = mask.astype(bool)
    one_doc = batch == 1 and bool(mask.all())  # no padding: no masking, Python backtracking
    score = start + emissions[:, 0]
    history = []
    for t in range(1, length):
        candidates = score[:, :, None] + transitions
        candidates += emissions[:, t][:, None, :]
        history.append(candidates.argmax(axis=1))
        step = candidates.max(axis=1)
        score = step if one_doc else numpy.where(mask[:, t][:, None], step, score)
    best_last = (score + end).argmax(axis=1)
    if one_doc:
        back = numpy.concatenate(history).tolist() if history else []
        path = [int(best_last[0])]
        for row in reversed(back):
            path.append(row[path[-1]])
        return [path[::-1]]
    last = mask.sum(axis=1) - 1
    tags = numpy.zeros((batch, length), dtype=numpy.int64)
    current = best_last
    rows = numpy.arange(batch)
    for t in range(length - 1, -1, -1):
        if t < length - 1:
            previous = history[t][rows, current]
            current = numpy.where(t == last, best_last, previous)
        tags[:, t] = current
    return [row[: n + 1] for row, n in zip(tags.tolist(), last.tolist())]
