"""Dropping unsure entities at decoding: the confidence of an entity (its least sure
token's marginal probability of the decoded tag), both Viterbi paths, and the pipe's
``min_confidence`` setting (its bounds; set on a loaded pipeline: test_bio_constraints)."""
import itertools

import numpy
import pytest
import spacy
import torch

from spacy_agban.inference import reference_inference
from spacy_agban.model.crf import OUTSIDE_TAG, CRFOutput, crf_log_marginals, drop_unsure_entities
from spacy_agban.pipeline import bio_spans, bio_tags

TAGS = bio_tags(["LOC", "PER"])  # O, B-LOC, I-LOC, B-PER, I-PER


def one_hot_marginals(rows, sure=0.9):
    """Marginals giving each decoded tag probability ``sure``."""
    length = max(len(r) for r in rows)
    marginals = numpy.full((len(rows), length, len(TAGS)), (1 - sure) / (len(TAGS) - 1), dtype="float32")
    for b, row in enumerate(rows):
        for t, tag in enumerate(row):
            marginals[b, t, tag] = sure
    return marginals


def test_an_entity_goes_whole_when_its_least_sure_token_is_below_the_threshold():
    # "B-PER I-PER O B-LOC I-PER": PER(0-2), LOC(3), a stray I-PER(4) read as its own entity
    rows = [[3, 4, 0, 1, 4]]
    marginals = one_hot_marginals(rows)
    marginals[0, 1, 4] = 0.4  # the second token of the PER entity is unsure
    assert drop_unsure_entities(rows, marginals, 0.5) == [[0, 0, 0, 1, 4]]
    assert drop_unsure_entities(rows, marginals, 0.3) == rows
    marginals[0, 4, 4] = 0.2  # the stray I-PER alone: only it goes, not the LOC before it
    assert drop_unsure_entities(rows, marginals, 0.5) == [[0, 0, 0, 1, 0]]
    # the tags of O tokens never count
    marginals = one_hot_marginals([[0, 1, 0]])
    marginals[0, 0, 0] = marginals[0, 2, 0] = 0.01
    assert drop_unsure_entities([[0, 1, 0]], marginals, 0.5) == [[0, 1, 0]]


def test_entities_are_read_as_the_pipe_reads_them():
    """Every tag sequence: what survives a threshold is exactly the pipe's entities whose
    least sure token clears it."""
    nlp = spacy.blank("en")
    doc = nlp.make_doc("a b c d")
    rng = numpy.random.default_rng(0)
    for row in itertools.product(range(len(TAGS)), repeat=4):
        marginals = rng.uniform(size=(1, 4, len(TAGS))).astype("float32")
        kept = drop_unsure_entities([list(row)], marginals, 0.5)[0]
        expected = [
            (s.start, s.end, s.label_) for s in bio_spans(doc, [TAGS[t] for t in row])
            if min(marginals[0, t, row[t]] for t in range(s.start, s.end)) >= 0.5
        ]
        assert [(s.start, s.end, s.label_) for s in bio_spans(doc, [TAGS[t] for t in kept])] == expected


def random_crf(seed: int) -> CRFOutput:
    torch.manual_seed(seed)
    crf = CRFOutput(width=4, n_tags=len(TAGS), dropout=0.0)
    with torch.no_grad():
        crf.crf.transitions.normal_(0.0, 1.0)
    return crf.eval()


def test_decoding_with_a_threshold_drops_the_entities_its_marginals_call_unsure():
    rng = numpy.random.default_rng(0)
    features = torch.from_numpy(rng.normal(size=(16, 12, 4)).astype("float32"))
    lengths = torch.from_numpy(rng.integers(1, 13, size=16))
    lengths[0] = 12
    mask = torch.arange(12)[None, :] < lengths[:, None]
    crf = random_crf(0)
    plain = crf.decode(features, mask)
    crf.min_confidence = 0.6
    with torch.no_grad():
        marginals = crf_log_marginals(crf.scores(features), mask, crf.crf.start_transitions,
                                      crf.crf.transitions, crf.crf.end_transitions).exp().numpy()
    dropped = crf.decode(features, mask)
    assert dropped == drop_unsure_entities(plain, marginals, 0.6)
    entity_tokens = sum(t != OUTSIDE_TAG for row in plain for t in row)
    kept_tokens = sum(t != OUTSIDE_TAG for row in dropped for t in row)
    assert 0 < kept_tokens < entity_tokens  # the control: some go, some stay
    with reference_inference():  # the torch Viterbi path gives the same tags
        assert crf.decode(features, mask) == dropped
    assert crf.decode(features[:1], mask[:1]) == dropped[:1]  # one doc alone agrees with the batch


def test_marginals_equal_brute_force_enumeration():
    crf = random_crf(1)
    rng = numpy.random.default_rng(1)
    features = torch.from_numpy(rng.normal(size=(1, 4, 4)).astype("float32"))
    mask = torch.ones((1, 4), dtype=torch.bool)
    with torch.no_grad():
        scores = crf.scores(features)[0]
        start, transitions, end = crf.crf.start_transitions, crf.crf.transitions, crf.crf.end_transitions
        marginals = crf_log_marginals(scores[None], mask, start, transitions, end).exp()[0]
        expected = torch.zeros_like(marginals)
        for path in itertools.product(range(len(TAGS)), repeat=4):
            score = start[path[0]] + end[path[-1]] + sum(scores[t, k] for t, k in enumerate(path))
            score = score + sum(transitions[a, b] for a, b in zip(path, path[1:]))
            for t, k in enumerate(path):
                expected[t, k] += score.exp()
        expected /= expected.sum(dim=1, keepdim=True)
    assert torch.allclose(marginals, expected, atol=1e-5)


def test_a_threshold_outside_0_1_is_refused_with_what_it_must_be():
    # reaching the decoder and setting it on a loaded pipeline: test_bio_constraints
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="min_confidence must be in"):
            spacy.blank("en").add_pipe("agban", config={"min_confidence": bad})



def test_half_precision_decoding_drops_by_float32_marginals():
    # mixed-precision inference decodes float16 scores; marginals summed in float16 are off by
    # about 0.01, enough to flip entities near the threshold, so decode computes them in float32
    rng = numpy.random.default_rng(2)
    features = torch.from_numpy(rng.normal(size=(16, 12, 4)).astype("float32")).half()
    mask = torch.arange(12)[None, :] < torch.from_numpy(rng.integers(3, 13, size=16))[:, None]
    crf = random_crf(2).half()
    plain = crf.decode(features, mask)
    with torch.no_grad():
        scores = crf.scores(features).float()
        marginals = crf_log_marginals(scores, mask, crf.crf.start_transitions.float(),
                                      crf.crf.transitions.float(), crf.crf.end_transitions.float()).exp().numpy()
    flipped = 0
    for threshold in numpy.arange(0.05, 0.96, 0.005):
        crf.min_confidence = float(threshold)
        expected = drop_unsure_entities(plain, marginals, float(threshold))
        assert crf.decode(features, mask) == expected
        flipped += expected != plain
    assert flipped > 0  # the control: the grid drops entities
