"""The word-shape feature: case classes, the featurizer's ids, and the model with it on."""
import numpy
import pytest
import spacy
from spacy.tokens import Doc

from spacy_agban.architectures import get_module
from spacy_agban.layers.featurize import CASES, N_SHAPES, PREFIXES, Featurizer, word_shape
from spacy_agban.inference import reference_inference

from conftest import CAPTION_POSTS, ents, make_doc, make_examples, make_nlp


def shape(case: str, prefix: str = "") -> int:
    return 1 + PREFIXES.index(prefix) * len(CASES) + CASES.index(case)


@pytest.mark.parametrize(
    "text,case,prefix",
    [
        ("paris", "lower", ""), ("Paris", "title", ""), ("PARIS", "upper", ""),
        ("iPhone", "mixed", ""), ("McDonald", "mixed", ""), ("I", "title", ""),
        ("2015", "none", ""), ("😀", "none", ""), ("!", "none", ""), ("café", "lower", ""),
        ("São", "title", ""), ("U.S.", "upper", ""), ("F1", "title", ""),
        ("@Obama", "title", "@"), ("@nytimes", "lower", "@"), ("#NYC", "upper", "#"),
        ("#", "none", "#"), ("东京", "lower", ""),
    ],
)
def test_word_shape_reads_case_and_prefix(text, case, prefix):
    assert word_shape(text) == shape(case, prefix)


def test_shape_ids_are_distinct_and_leave_zero_for_padding():
    ids = {shape(case, prefix) for case in CASES for prefix in PREFIXES}
    assert len(ids) == len(CASES) * len(PREFIXES)
    assert min(ids) == 1 and max(ids) == N_SHAPES - 1


def test_featurizer_gives_each_token_its_shape_and_zero_on_padding():
    vocab = spacy.blank("en").vocab
    docs = [Doc(vocab, words=["I", "love", "Paris"]),
            Doc(vocab, words=["@Obama", "at", "#NYC", "with", "iPhone"])]
    assert Featurizer([], 0, {}, max_word_chars=20)(docs, [None, None])["shape_ids"] is None
    arrays = Featurizer([], 0, {}, max_word_chars=20, shapes=True)(docs, [None, None])
    expected_first = [shape("title"), shape("lower"), shape("title")]
    assert arrays["shape_ids"][0].tolist() == expected_first + [0, 0]
    assert arrays["shape_ids"][1].tolist() == [
        shape("title", "@"), shape("lower"), shape("upper", "#"), shape("lower"), shape("mixed"),
    ]
    # the cache keyed by form gives the same ids the second time
    again = Featurizer([], 0, {}, max_word_chars=20, shapes=True)
    again(docs, [None, None])
    assert numpy.array_equal(again(docs, [None, None])["shape_ids"], arrays["shape_ids"])


def shape_weights(nlp) -> numpy.ndarray:
    return get_module(nlp.get_pipe("agban").model).text.shapes.weight.detach().numpy().copy()


@pytest.fixture(scope="module")
def trained_with_shapes():
    """A pipeline with shape_dim = 6 trained 40 steps, and its shape table before training."""
    nlp = make_nlp(fusion="concat", adversarial=False, shape_dim=6)
    examples = make_examples(nlp, CAPTION_POSTS)
    optimizer = nlp.initialize(lambda: examples)
    optimizer.learn_rate = 0.02
    before = shape_weights(nlp)
    for _ in range(40):
        nlp.update(examples, sgd=optimizer)
    return nlp, before


@pytest.fixture(scope="module")
def shaped_nlp(trained_with_shapes):
    return trained_with_shapes[0]


def test_the_shape_embedding_is_in_the_model_and_learns(trained_with_shapes):
    nlp, before = trained_with_shapes
    text = get_module(nlp.get_pipe("agban").model).text
    assert text.shapes is not None and text.shapes.weight.shape[1] == 6
    assert text.lstm.input_size == text.word_embed.embedding_dim + text.chars.width + 6
    after = shape_weights(nlp)
    assert not numpy.allclose(after, before)
    assert numpy.all(after[0] == 0)  # the padding row stays zero


def test_shape_dim_zero_leaves_the_model_as_it_was():
    nlp = make_nlp(fusion="concat", adversarial=False)
    nlp.initialize(lambda: make_examples(nlp, CAPTION_POSTS))
    text = get_module(nlp.get_pipe("agban").model).text
    assert text.shapes is None
    assert text.lstm.input_size == text.word_embed.embedding_dim + text.chars.width


@pytest.mark.parametrize("batch_size", [1, 8])
def test_shapes_take_the_same_path_fast_and_reference(shaped_nlp, batch_size):
    """One post alone goes through the numpy copy of the word BiLSTM, which must add the
    shape embedding as the torch path does."""
    posts = [("I love Paris", None), ("@Obama visits NEW YORK with an iPhone", "a man"),
             ("paris and PARIS and Paris", "the eiffel tower at night")] * 3

    def run():
        docs = [make_doc(shaped_nlp, text, caption) for text, caption in posts]
        return [ents(doc) for doc in shaped_nlp.pipe(docs, batch_size=batch_size)]

    with reference_inference():
        reference = run()
    assert any(reference)  # entities to compare
    assert run() == reference


def test_shape_dim_survives_save_and_load(shaped_nlp, tmp_path):
    shaped_nlp.to_disk(tmp_path / "nlp")
    loaded = spacy.load(tmp_path / "nlp")
    assert loaded.get_pipe("agban").model.attrs["shape_dim"] == 6
    doc = make_doc(shaped_nlp, "@Obama visits NEW YORK with an iPhone", "a man")
    assert ents(loaded(make_doc(loaded, doc.text, "a man"))) == ents(shaped_nlp(doc))
