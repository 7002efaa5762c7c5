"""The spaCy baseline's embedding (``spacy_agban.MultiHashEmbedLower.v1``): static vectors
looked up by the lowercase form, before saving and after ``spacy.load``."""
import numpy
import spacy

import spacy_agban.layers.static_vectors  # noqa: F401  (registers the baseline's embedding)
from spacy_agban.layers.static_vectors import STATIC_VECTORS

BASELINE_NER = {
    "@architectures": "spacy.TransitionBasedParser.v2",
    "state_type": "ner", "extra_state_tokens": False, "hidden_width": 8,
    "maxout_pieces": 2, "use_upper": True, "nO": None,
    "tok2vec": {
        "@architectures": "spacy.Tok2Vec.v2",
        "embed": {
            "@architectures": "spacy_agban.MultiHashEmbedLower.v1", "width": 8,
            "attrs": ["NORM", "PREFIX", "SUFFIX", "SHAPE"], "rows": [50, 50, 50, 50],
            "vectors_attr": "LOWER",
        },
        "encode": {
            "@architectures": "spacy.MaxoutWindowEncoder.v2", "width": 8, "depth": 1,
            "window_size": 1, "maxout_pieces": 2,
        },
    },
}


def baseline_nlp():
    """A tiny spaCy ner with lowercase-only vectors, as GloVe 6B has them."""
    nlp = spacy.blank("en")
    nlp.vocab.reset_vectors(width=4)
    rng = numpy.random.default_rng(0)
    for word in ("paris", "london", "love"):
        nlp.vocab.set_vector(word, rng.normal(size=4).astype("float32"))
    ner = nlp.add_pipe("ner", config={"model": BASELINE_NER})
    ner.add_label("LOC")
    nlp.initialize()
    return nlp


def static_vector_rows(nlp, text: str) -> numpy.ndarray:
    layer = next(n for n in nlp.get_pipe("ner").model.walk() if n.name == STATIC_VECTORS)
    output, _ = layer([nlp.make_doc(text)], is_train=False)
    return numpy.asarray(output.data)


def test_baseline_vector_lookup_survives_reload(tmp_path):
    nlp = baseline_nlp()
    before = static_vector_rows(nlp, "Paris PARIS paris")
    assert numpy.abs(before).sum(axis=1).min() > 0  # capitalized forms found by LOWER
    assert numpy.allclose(before[0], before[2])
    nlp.to_disk(tmp_path / "nlp")
    reloaded = spacy.load(tmp_path / "nlp")
    after = static_vector_rows(reloaded, "Paris PARIS paris")
    assert numpy.allclose(before, after)
    # the vocab's own setting is back to exact tokens after loading: the layer must not use it
    assert reloaded.vocab.vectors.attr == spacy.attrs.ORTH
    doc = reloaded("I love Paris")
    assert [t.text for t in doc] == ["I", "love", "Paris"]


def test_baseline_layer_unknown_words_are_zero():
    nlp = baseline_nlp()
    rows = static_vector_rows(nlp, "Kolo Paris")
    assert numpy.abs(rows[0]).sum() == 0 and numpy.abs(rows[1]).sum() > 0
