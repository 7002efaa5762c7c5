"""Decoding valid BIO sequences only: the penalties' layout, both Viterbi paths, and the
pipe's prediction-only settings (``bio_constraints``, ``min_confidence``: off by default,
switchable on a loaded pipeline)."""
import numpy
import pytest
import spacy
import torch

from spacy_agban.architectures import get_module
from spacy_agban.inference import reference_inference
from spacy_agban.model.crf import OUTSIDE_TAG, CRFOutput, bio_penalties, viterbi_decode_numpy
from spacy_agban.pipeline import bio_tags

from conftest import CAPTION_POSTS, make_examples, make_nlp

TAGS = bio_tags(["LOC", "MISC", "ORG", "PER"])


def invalid_steps(path, tags=TAGS) -> int:
    """Positions whose I- tag does not continue a B-/I- of the same label."""
    count, previous = 0, "O"
    for index in path:
        tag = tags[index]
        if tag.startswith("I-") and previous[2:] != tag[2:]:
            count += 1
        previous = tag
    return count


def test_penalties_forbid_exactly_the_invalid_bio_steps():
    start, transitions = bio_penalties(len(TAGS))
    assert TAGS[OUTSIDE_TAG] == "O"
    for j, tag in enumerate(TAGS):
        assert (start[j] < 0) == tag.startswith("I-")
        for i, previous in enumerate(TAGS):
            allowed = not tag.startswith("I-") or (previous != "O" and previous[2:] == tag[2:])
            assert (transitions[i, j] == 0) == allowed, (previous, tag)


def random_crf(seed: int):
    torch.manual_seed(seed)
    crf = CRFOutput(width=4, n_tags=len(TAGS), dropout=0.0)
    with torch.no_grad():  # transitions that like invalid steps, as an untrained CRF may
        crf.crf.transitions.normal_(0.0, 2.0)
        crf.crf.start_transitions.normal_(0.0, 2.0)
    return crf.eval()


def test_constrained_decoding_never_yields_an_invalid_sequence_on_either_path():
    rng = numpy.random.default_rng(0)
    features = torch.from_numpy(rng.normal(size=(16, 25, 4)).astype("float32")) * 3
    lengths = torch.from_numpy(rng.integers(1, 26, size=16))
    lengths[0] = 25
    mask = torch.arange(25)[None, :] < lengths[:, None]
    crf = random_crf(0)
    plain = crf.decode(features, mask)
    assert sum(invalid_steps(path) for path in plain) > 0  # the control: they do occur
    crf.bio_constraints = True
    constrained = crf.decode(features, mask)
    assert all(invalid_steps(path) == 0 for path in constrained)
    assert [len(p) for p in constrained] == lengths.tolist()
    with reference_inference():  # the torch Viterbi gives the same tags
        assert crf.decode(features, mask) == constrained
    # one doc alone (the Python backtracking) agrees with the batch
    assert crf.decode(features[:1], mask[:1]) == constrained[:1]


def test_constrained_decoding_changes_only_invalid_paths():
    """A path that is valid already is the constrained optimum too."""
    rng = numpy.random.default_rng(1)
    k = len(TAGS)
    start, transitions = bio_penalties(k)
    for _ in range(50):
        emissions = rng.normal(size=(1, 12, k)).astype("float32")
        mask = numpy.ones((1, 12), dtype=bool)
        zeros = numpy.zeros(k, dtype="float32")
        trans = rng.normal(size=(k, k)).astype("float32")
        plain = viterbi_decode_numpy(emissions, mask, zeros, trans, zeros)[0]
        constrained = viterbi_decode_numpy(emissions, mask, start, trans + transitions, zeros)[0]
        if invalid_steps(plain) == 0:
            assert constrained == plain


@pytest.mark.parametrize("setting,default,value", [("bio_constraints", False, True), ("min_confidence", 0.0, 0.5)])
def test_prediction_settings_reach_the_decoder_and_can_be_set_on_a_loaded_pipeline(tmp_path, setting, default, value):
    """The pipe's prediction-only settings (this file's and test_min_confidence's)."""
    nlp = make_nlp()
    examples = make_examples(nlp, CAPTION_POSTS)
    optimizer = nlp.initialize(lambda: examples)
    nlp.update(examples, sgd=optimizer)
    pipe = nlp.get_pipe("agban")
    assert getattr(pipe, setting) == default
    nlp("A man in Paris")
    assert getattr(get_module(pipe.model).output, setting) == default
    nlp.to_disk(tmp_path / "model")
    loaded = spacy.load(tmp_path / "model", config={"components": {"agban": {setting: value}}})
    assert getattr(loaded.get_pipe("agban"), setting) == value
    loaded("A man in Paris")
    assert getattr(get_module(loaded.get_pipe("agban").model).output, setting) == value
    assert getattr(spacy.load(tmp_path / "model").get_pipe("agban"), setting) == default
