"""A confidence per predicted entity: the CRF quantity ``min_confidence`` thresholds, in
``doc.spans[spans_key]`` with spancat's ``attrs["scores"]`` and as ``span._.agban_confidence``."""
import contextlib

import numpy
import pytest
import spacy
import torch
from spacy.tokens import Doc, DocBin

from conftest import CAPTION_POSTS, make_doc, make_examples, make_nlp
from spacy_agban.inference import reference_inference
from spacy_agban.model.crf import (
    CRFOutput, bio_penalties, crf_log_marginals, crf_marginals_numpy, entity_confidences,
)
from spacy_agban.model.tags import entity_spans
from spacy_agban.pipeline import bio_tags

TAGS = bio_tags(["LOC", "PER"])


def random_crf(seed: int) -> CRFOutput:
    torch.manual_seed(seed)
    crf = CRFOutput(width=4, n_tags=len(TAGS), dropout=0.0)
    with torch.no_grad():
        crf.crf.transitions.normal_(0.0, 1.0)
    crf.store_confidence = True
    return crf.eval()


def random_batch(seed: int, n: int = 24, length: int = 12):
    rng = numpy.random.default_rng(seed)
    features = torch.from_numpy(rng.normal(size=(n, length, 4)).astype("float32"))
    lengths = torch.from_numpy(rng.integers(1, length + 1, size=n))
    lengths[0] = length
    return features, torch.arange(length)[None, :] < lengths[:, None]


def scored_entities(tags, confidences):
    return [{span: c for span, c in zip(entity_spans(row), doc)} for row, doc in zip(tags, confidences)]


@pytest.mark.parametrize("reference", [False, True], ids=["numpy", "torch"])
def test_a_kept_entity_has_at_least_the_threshold_and_a_dropped_one_less(reference):
    crf = random_crf(0)
    features, mask = random_batch(0)
    with reference_inference() if reference else contextlib.nullcontext():
        everything = scored_entities(*crf.decode_scored(features, mask))
        crf.min_confidence = 0.6
        kept = scored_entities(*crf.decode_scored(features, mask))
    n_kept = n_dropped = 0
    for before, after in zip(everything, kept):
        for span, confidence in before.items():
            if span in after:
                assert after[span] == confidence >= 0.6
                n_kept += 1
            else:
                assert confidence < 0.6
                n_dropped += 1
        assert set(after) <= set(before)
    assert n_kept > 0 and n_dropped > 0  # the control: the threshold splits the entities


def test_numpy_and_torch_marginals_agree_with_padding_and_forbidden_tags():
    crf = random_crf(1)
    features, mask = random_batch(1)
    start_penalty, transition_penalty = (torch.from_numpy(p) for p in bio_penalties(len(TAGS)))
    with torch.no_grad():
        scores = crf.scores(features)
        scores[3, 2, 1:] = torch.finfo(scores.dtype).min / 4  # an outside-only token
        start = crf.crf.start_transitions + start_penalty
        transitions = crf.crf.transitions + transition_penalty
        end = crf.crf.end_transitions
        expected = crf_log_marginals(scores, mask, start, transitions, end).exp().numpy()
        got = crf_marginals_numpy(*(x.numpy() for x in (scores, mask, start, transitions, end)))
    real = mask.numpy()
    assert numpy.allclose(got[real], expected[real], atol=1e-4)
    assert numpy.allclose(got[real].sum(axis=-1), 1.0)
    assert got[3, 2, 1:].max() == 0.0  # a forbidden tag has no probability at all


def test_entity_confidence_is_the_least_sure_token_of_its_decoded_tags():
    marginals = numpy.full((1, 5, len(TAGS)), 0.05, dtype="float32")
    row = [3, 4, 0, 1, 4]  # PER(0-2), O, LOC(3), a stray I-PER(4): three entities
    for t, tag in enumerate(row):
        marginals[0, t, tag] = 0.8
    marginals[0, 1, 4] = 0.55
    marginals[0, 4, 4] = 0.3
    assert entity_confidences([row], marginals) == [pytest.approx([0.55, 0.8, 0.3])]


# ----- the pipe ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def untrained():
    """An initialized, untrained pipe: its confidences are spread (a trained one's near 1)."""
    spacy.util.fix_random_seed(0)
    nlp = make_nlp()
    nlp.initialize(lambda: make_examples(nlp, CAPTION_POSTS))
    return nlp


TEXTS = ["Kolo is here with Paris and Apple today", "I love Paris", "Visiting Apple today in Paris",
         "Kolo Kolo Paris Apple Kolo is here", ""]


def run(nlp, **settings):
    pipe = nlp.get_pipe("agban")
    saved = {name: getattr(pipe, name) for name in settings}
    for name, value in settings.items():
        setattr(pipe, name, value)
    try:
        return list(nlp.pipe([make_doc(nlp, text, "a man smiling at the camera") for text in TEXTS * 3]))
    finally:
        for name, value in saved.items():
            setattr(pipe, name, value)


def test_the_pipe_stores_one_confidence_per_entity_as_spancat_does(untrained):
    docs = run(untrained)
    assert sum(len(doc.ents) for doc in docs) > 3
    for doc in docs:
        group = doc.spans["agban"]
        assert list(group) == list(doc.ents)
        scores = group.attrs["scores"]
        assert len(scores) == len(doc.ents) and all(0.0 < s <= 1.0 for s in scores)
        assert [ent._.agban_confidence for ent in doc.ents] == pytest.approx(list(scores))
    single = untrained(make_doc(untrained, TEXTS[0], "a man smiling at the camera"))
    assert list(single.spans["agban"].attrs["scores"]) == pytest.approx(list(docs[0].spans["agban"].attrs["scores"]))


def test_the_pipe_keeps_exactly_the_entities_at_or_above_min_confidence(untrained):
    everything = {(i, e.start, e.end, e.label_): e._.agban_confidence
                  for i, doc in enumerate(run(untrained)) for e in doc.ents}
    threshold = float(numpy.median(list(everything.values())))
    kept = {(i, e.start, e.end, e.label_): e._.agban_confidence
            for i, doc in enumerate(run(untrained, min_confidence=threshold)) for e in doc.ents}
    assert kept == {key: c for key, c in everything.items() if c >= threshold}
    assert 0 < len(kept) < len(everything)


def test_confidences_survive_a_docbin_and_can_be_switched_off_or_rekeyed(untrained):
    docs = run(untrained)
    restored = list(DocBin(store_user_data=True, docs=docs).get_docs(untrained.vocab))
    assert [[e._.agban_confidence for e in d.ents] for d in restored] == \
        [[e._.agban_confidence for e in d.ents] for d in docs]
    copied = Doc(untrained.vocab).from_bytes(docs[0].to_bytes())  # as nlp.pipe(n_process=2) sends docs
    assert [e._.agban_confidence for e in copied.ents] == [e._.agban_confidence for e in docs[0].ents]
    off = run(untrained, store_confidence=False)
    assert "agban" not in off[0].spans and off[0].ents and off[0].ents[0]._.agban_confidence is None
    rekeyed = run(untrained, spans_key="ner_scores")
    assert "agban" not in rekeyed[0].spans
    assert rekeyed[0].ents[0]._.agban_confidence == docs[0].ents[0]._.agban_confidence
    with pytest.raises(ValueError, match="spans_key must be a non-empty string"):
        spacy.blank("en").add_pipe("agban", config={"spans_key": ""})
