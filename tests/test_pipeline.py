"""The agban component end to end on a tiny model (after spaCy's test_ner overfitting)."""
import pickle

import numpy
import pytest
import torch
import spacy
import srsly
from PIL import Image
from spacy.cli.init_pipeline import _init_labels
from spacy.tokens import DocBin
from spacy.training import Example

from conftest import (
    CAPTION_POSTS, TEXT_POSTS, ents, make_doc, make_examples, make_nlp, train,
)
from spacy_agban.architectures import get_module
from spacy_agban.units.base import (
    CAPTION, CaptionUnits, CaptionWarning, SkipWarnings, UnitSource, VisualUnit,
)


def test_overfit_with_caption_units_then_reload(caption_pipeline):
    nlp, path = caption_pipeline
    expected = [entities for _, _, entities in CAPTION_POSTS]
    docs = [nlp(make_doc(nlp, text, caption)) for text, caption, _ in CAPTION_POSTS]
    assert [ents(d) for d in docs] == expected
    assert docs[0]._.visual_units and all(u["source"] == "caption" for u in docs[0]._.visual_units)
    reloaded = spacy.load(path)
    docs2 = [reloaded(make_doc(reloaded, text, caption)) for text, caption, _ in CAPTION_POSTS]
    assert [ents(d) for d in docs2] == expected
    assert docs2[0]._.visual_units == docs[0]._.visual_units


def one_thread_torch():
    """PyTorch's OpenMP thread pool does not survive fork: with more than one torch
    thread a forked worker can hang on its first parallel op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


def test_overfit_pipeline_survives_bytes_pickle_and_worker_processes(caption_pipeline):
    """As for spaCy's own pipes: nlp.to_bytes into a blank pipeline of the same config,
    a pickled nlp, and nlp.pipe in two processes all tag as the trained pipeline."""
    nlp, _ = caption_pipeline
    expected = [entities for _, _, entities in CAPTION_POSTS]

    def tagged(pipeline, **kwargs):
        docs = [make_doc(pipeline, text, caption) for text, caption, _ in CAPTION_POSTS]
        return [ents(doc) for doc in pipeline.pipe(docs, **kwargs)]

    from_bytes = spacy.blank("en", config=nlp.config).from_bytes(nlp.to_bytes())
    assert tagged(from_bytes) == expected
    assert tagged(pickle.loads(pickle.dumps(nlp))) == expected
    threads = one_thread_torch()
    try:
        assert tagged(from_bytes, n_process=2, batch_size=2) == expected
    finally:
        torch.set_num_threads(threads)


def test_serialization_honours_exclude(caption_pipeline, tmp_path):
    nlp, path = caption_pipeline
    pipe = nlp.get_pipe("agban")
    assert set(srsly.msgpack_loads(pipe.to_bytes(exclude=["model"]))) == {"cfg"}
    pipe.to_disk(tmp_path / "agban", exclude=["model"])
    assert [p.name for p in (tmp_path / "agban").iterdir()] == ["cfg"]
    fresh_nlp = make_nlp()
    fresh = fresh_nlp.get_pipe("agban")
    fresh.from_bytes(pipe.to_bytes(), exclude=["model"])
    assert fresh.labels == pipe.labels and not fresh.is_initialized
    fresh.cfg["max_words"] = 7  # read only from a saved cfg
    fresh.from_disk(path / "agban", exclude=["cfg"])
    assert fresh.is_initialized and fresh.cfg["max_words"] == 7
    fresh.from_disk(path / "agban")
    assert fresh.cfg == pipe.cfg
    docs = [fresh_nlp(make_doc(fresh_nlp, text, caption)) for text, caption, _ in CAPTION_POSTS]
    assert [ents(d) for d in docs] == [entities for _, _, entities in CAPTION_POSTS]


def test_labels_from_init_labels_or_from_the_examples(caption_pipeline, tmp_path):
    """`spacy init labels` saves label_data; [initialize.components.agban.labels] reads it
    back, as for spaCy's ner. Without it, the labels are the examples' entity types."""
    nlp, _ = caption_pipeline
    assert nlp.get_pipe("agban").label_data == ["LOC", "MISC", "ORG", "PER"]
    _init_labels(nlp, tmp_path)
    labels = srsly.read_json(tmp_path / "agban.json")
    srsly.write_json(tmp_path / "agban.json", labels + ["EVENT"])  # a type the examples lack
    fresh = make_nlp()
    fresh.config["initialize"]["components"]["agban"] = {
        "labels": {"@readers": "spacy.read_labels.v1", "path": str(tmp_path / "agban.json")}
    }
    examples = make_examples(fresh, CAPTION_POSTS[:1])
    fresh.initialize(lambda: examples)
    pipe = fresh.get_pipe("agban")
    assert pipe.labels == ("EVENT", "LOC", "MISC", "ORG", "PER")
    assert pipe.tags[:3] == ["O", "B-EVENT", "I-EVENT"]
    default = make_nlp()
    default.initialize(lambda: make_examples(default, CAPTION_POSTS[:1]))
    assert default.get_pipe("agban").labels == ("MISC",)


def test_update_sets_the_dropout_rate_to_its_drop():
    """As spaCy's pipes: ``drop`` is the dropout of that update, whatever the config says."""
    from thinc.api import fix_random_seed

    nlp = make_nlp(visual_dropout=0.0)  # the tiny model's dropout is 0
    examples = make_examples(nlp, CAPTION_POSTS)
    nlp.initialize(lambda: examples)
    pipe = nlp.get_pipe("agban")

    def loss(drop: float) -> float:
        fix_random_seed(0)
        return pipe.update(examples, drop=drop)["agban"]  # no optimizer: the weights stay

    assert loss(0.0) == loss(0.0)
    assert loss(0.5) != loss(0.0)
    loss(0.25)
    module = get_module(pipe.model)
    assert module.text.dropout.p == module.output.dropout.p == 0.25
    assert module.discriminator.layers[2].p == 0.0  # its own rate, not `dropout`'s


class SentenceLength(UnitSource):
    """A caption source of its own width: one unit per captioned doc."""

    def __init__(self):
        self.batches = []

    @property
    def width(self):
        return 5

    def __call__(self, docs):
        self.batches.append(len(docs))
        return [
            [VisualUnit(CAPTION, numpy.full(5, len(doc), "float32"), "length")] if doc._.image_caption else []
            for doc in docs
        ]


def test_unit_sources_share_one_interface():
    """The pipe asks a source for a batch's units and its width, nothing else."""
    nlp = make_nlp()
    pipe = nlp.get_pipe("agban")
    pipe.caption_units = source = SentenceLength()
    examples = make_examples(nlp, CAPTION_POSTS)
    nlp.initialize(lambda: examples)
    assert pipe.cfg["unit_dims"] == {"caption": 5}
    source.batches.clear()
    docs = list(nlp.pipe([make_doc(nlp, text, caption) for text, caption, _ in CAPTION_POSTS], batch_size=4))
    assert source.batches == [4]
    assert [d._.visual_units for d in docs] == [[{"source": "caption", "label": "length", "score": None, "box": None}]] * 4
    with pytest.raises(TypeError, match="UnitSource"):
        type(pipe)(nlp.vocab, pipe.model, caption_units=lambda doc: [])


def test_overfit_text_only_then_reload(tmp_path):
    nlp = make_nlp(fusion="none", adversarial=False, caption_top_k=None)
    losses = train(nlp, make_examples(nlp, TEXT_POSTS))
    assert losses["agban"] < 0.5
    assert losses["agban_adv"] == 0.0
    expected = [entities for _, _, entities in TEXT_POSTS]
    assert [ents(nlp(t)) for t, _, _ in TEXT_POSTS] == expected
    nlp.to_disk(tmp_path / "model")
    reloaded = spacy.load(tmp_path / "model")
    assert [ents(reloaded(t)) for t, _, _ in TEXT_POSTS] == expected


def test_text_only_cannot_fit_caption_dependent_types():
    """The control for the caption test: without units the two 'Kolo' posts collide."""
    nlp = make_nlp(fusion="none", adversarial=False, caption_top_k=None)
    train(nlp, make_examples(nlp, CAPTION_POSTS))
    first, second = (nlp(make_doc(nlp, t, c)) for t, c, _ in CAPTION_POSTS[:2])
    assert ents(first) == ents(second)


def test_pipe_equals_call_for_a_mixed_batch(caption_pipeline):
    nlp, _ = caption_pipeline
    posts = [
        ("Kolo is here", "a dog playing on the grass"),
        ("", "a man smiling"),
        ("Kolo is here", None),
        ("Visiting Apple today in Paris with Kolo " * 5, "a store with phones"),
        ("I love Paris", "zzz unknownword"),
    ]
    one_by_one = [nlp(make_doc(nlp, t, c)) for t, c in posts]
    batched = list(nlp.pipe([make_doc(nlp, t, c) for t, c in posts], batch_size=5))
    assert [ents(d) for d in batched] == [ents(d) for d in one_by_one]
    assert [d._.visual_units for d in batched] == [d._.visual_units for d in one_by_one]
    assert one_by_one[2]._.visual_units == []


@pytest.mark.parametrize(
    "text",
    ["", "Kolo", "Kolo is here " * 200, "Kolo 😀🔥 is here 👍", "東京 で Kolo に 会った", "Привет Kolo !"],
)
def test_edge_docs_get_a_tag_per_token(caption_pipeline, text):
    nlp, _ = caption_pipeline
    doc = make_doc(nlp, text, "a dog playing on the grass")
    pred = nlp.get_pipe("agban").predict([doc])[0]
    assert len(pred["tags"]) == len(doc)
    nlp(doc)  # sets ents without error
    assert all(e.end <= len(doc) for e in doc.ents)


@pytest.mark.parametrize("caption, label", [("a man smiling at the camera", "PER"),
                                            ("a dog playing on the grass", "MISC")])
def test_a_600_token_doc_is_tagged_to_its_end(caption_pipeline, caption, label):
    # the overfitted model tags every "Kolo" by the caption, also hundreds of tokens in
    nlp, _ = caption_pipeline
    doc = nlp(make_doc(nlp, "Kolo is here " * 200, caption))
    assert len(doc) == 600
    assert [(e.start, e.end, e.label_) for e in doc.ents] == [(i, i + 1, label) for i in range(0, 600, 3)]


def test_uninitialized_pipe_raises_a_clear_error():
    nlp = make_nlp()
    with pytest.raises(ValueError, match="not initialized"):
        nlp("Kolo is here")


def test_update_skips_empty_docs_and_reports_both_losses():
    nlp = make_nlp()
    examples = make_examples(nlp, CAPTION_POSTS)
    optimizer = nlp.initialize(lambda: examples)
    empty = Example.from_dict(nlp.make_doc(""), {"entities": []})
    losses = {}
    nlp.update([empty], sgd=optimizer, losses=losses)
    assert losses["agban"] == 0.0
    nlp.update(examples + [empty], sgd=optimizer, losses=losses)
    assert losses["agban"] > 0.0 and losses["agban_adv"] > 0.0


def test_every_parameter_is_updated_by_the_optimizer():
    """CRF transitions and the discriminator sit inside the wrapped module."""
    from spacy_agban.architectures import get_module

    nlp = make_nlp()
    examples = make_examples(nlp, CAPTION_POSTS)
    optimizer = nlp.initialize(lambda: examples)
    module = get_module(nlp.get_pipe("agban").model)
    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    nlp.update(examples, sgd=optimizer)
    unchanged = [k for k, v in module.named_parameters() if k in before and torch_equal(v, before[k])]
    # word_embed rows of unseen words stay put; everything else must move
    assert "output.crf.transitions" not in unchanged
    assert not [k for k in unchanged if k.startswith(("discriminator", "fusion", "visual"))]


def torch_equal(a, b) -> bool:
    return bool((a.detach() == b).all())


def test_vector_lookup_is_lowercase_before_and_after_reload(tmp_path):
    """GloVe 6B is lowercase and spaCy 3.8 does not save Vectors.attr: the lookup the
    model trained with must be the one it uses after loading."""
    from spacy_agban.layers.featurize import Featurizer
    from spacy_agban.units.base import DocUnits

    def static_vectors(pipeline):  # the featurizer's lookup, as the model gets it
        doc = pipeline.make_doc("PARIS Paris")
        return Featurizer([], 8, {}, 4)([doc], [DocUnits([])])["static_vectors"][0]

    nlp = make_nlp(fusion="none", adversarial=False, caption_top_k=None)
    train(nlp, make_examples(nlp, TEXT_POSTS), steps=2)
    expected = nlp.vocab.get_vector("paris")
    assert numpy.allclose(static_vectors(nlp), expected)
    nlp.to_disk(tmp_path / "model")
    reloaded = spacy.load(tmp_path / "model")
    vectors = static_vectors(reloaded)
    assert numpy.allclose(vectors, expected) and numpy.abs(vectors).sum() > 0


def test_attention_is_recorded_on_request(caption_pipeline):
    nlp, _ = caption_pipeline
    pipe = nlp.get_pipe("agban")
    pipe.record_attention = True
    try:
        docs = list(nlp.pipe([
            make_doc(nlp, "Kolo is here", "a dog playing on the grass"),
            make_doc(nlp, "I love Paris", "the tower"),
            make_doc(nlp, "Kolo is here", None),
        ]))
    finally:
        pipe.record_attention = False
    full, short, none = (d._.agban_attention for d in docs)
    assert numpy.allclose(numpy.asarray(full["attention"]).sum(axis=1), 1.0)
    assert numpy.asarray(short["attention"]).shape == (3, 1)
    assert numpy.asarray(none["attention"]).shape == (3, 0)
    assert all(0.0 <= g <= 1.0 for g in full["gate"])


@pytest.mark.slow
def test_overfit_with_object_units_then_reload(tmp_path):
    """Same text, different images -> different types: the object units must be used."""
    nlp = make_nlp(caption_top_k=None, object_units={"@misc": "tests.FakeObjects.v1"})
    posts = [("Kolo is here", "dog.jpg", [(0, 4, "MISC")]), ("Kolo is here", "man.jpg", [(0, 4, "PER")]),
             ("I love Paris", None, [(7, 12, "LOC")])]
    examples = []
    for text, image, entities in posts:
        eg = Example.from_dict(nlp.make_doc(text), {"entities": entities})
        eg.predicted._.image = eg.reference._.image = image
        examples.append(eg)
    losses = train(nlp, examples)
    assert losses["agban_adv"] > 0

    def run(pipeline):
        docs = []
        for text, image, _ in posts:
            doc = pipeline.make_doc(text)
            doc._.image = image
            docs.append(pipeline(doc))
        return docs

    docs = run(nlp)
    assert [ents(d) for d in docs] == [e for _, _, e in posts]
    assert [u["source"] for u in docs[0]._.visual_units] == ["object", "object"]
    assert docs[2]._.visual_units == []
    nlp.to_disk(tmp_path / "model")
    assert [ents(d) for d in run(spacy.load(tmp_path / "model"))] == [e for _, _, e in posts]


def test_learn_rate_scale_scales_this_components_updates():
    """A component's own learning rate: the same SGD step, `learn_rate_scale` times as long."""
    from thinc.api import SGD, fix_random_seed

    from spacy_agban.architectures import get_module

    deltas = []
    for scale in (1.0, 3.0):
        fix_random_seed(0)
        nlp = make_nlp()
        nlp.get_pipe("agban").learn_rate_scale = scale
        examples = make_examples(nlp, CAPTION_POSTS)
        nlp.initialize(lambda: examples)
        module = get_module(nlp.get_pipe("agban").model)
        before = {k: v.detach().clone() for k, v in module.state_dict().items()}
        nlp.update(examples, sgd=SGD(0.01))
        deltas.append({k: v.detach() - before[k] for k, v in module.state_dict().items()})
    moved = [k for k in deltas[0] if deltas[0][k].abs().max() > 1e-6]
    assert moved
    for key in moved:
        numpy.testing.assert_allclose(deltas[1][key].numpy(), 3.0 * deltas[0][key].numpy(), rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="learn_rate_scale"):
        make_nlp().get_pipe("agban").__class__(spacy.blank("en").vocab, None, learn_rate_scale=0)


BAD_CAPTIONS = {3: 7, 10: 0, 20: 2.5, 30: ["a", "dog"], 40: b"a dog", 50: True}


def test_bad_captions_cost_only_their_doc(caption_pipeline):
    nlp, _ = caption_pipeline

    def docs(with_bad: bool):
        result = []
        for i in range(64):
            text, caption, _ = CAPTION_POSTS[i % 4]
            bad = BAD_CAPTIONS.get(i) if with_bad else None
            result.append(make_doc(nlp, f"{text} bad-caption-batch {i}", caption if bad is None else bad))
        return result

    with pytest.warns(CaptionWarning) as record:
        piped = list(nlp.pipe(docs(with_bad=True), batch_size=64))
    assert len(piped) == 64
    messages = [str(w.message) for w in record]
    assert len(messages) == len(BAD_CAPTIONS)
    for i, bad in BAD_CAPTIONS.items():
        (message,) = [m for m in messages if f"bad-caption-batch {i}'" in m]
        assert f"not {type(bad).__name__}" in message and "without caption units" in message
    clean = list(nlp.pipe(docs(with_bad=False), batch_size=64))
    for i, (doc, reference) in enumerate(zip(piped, clean)):
        if i in BAD_CAPTIONS:
            assert doc._.visual_units == []
        else:  # the rest of the batch is untouched
            assert doc._.visual_units == reference._.visual_units and ents(doc) == ents(reference)


def test_skipped_captions_past_the_limit_are_counted_and_logged(caption_pipeline, caplog, monkeypatch):
    nlp, _ = caption_pipeline
    units = CaptionUnits(top_k=3)
    docs = [make_doc(nlp, f"counted {i}") for i in range(13)]
    for doc in docs:
        doc._.image_caption = 1
    with pytest.warns(CaptionWarning) as record:
        assert [units.for_doc(doc) for doc in docs] == [[]] * 13
    assert len(record) == 11 and "further captions are skipped" in str(record[-1].message)
    units.skipped.report()
    assert "3 more captions could not be used" in caplog.text and "(13 in all so far)" in caplog.text
    # Inside the pipe, the count is logged at the end of each batch.
    caplog.clear()
    monkeypatch.setattr(nlp.get_pipe("agban").caption_units, "skipped", SkipWarnings("captions", CaptionWarning, limit=0))
    for doc in docs:
        doc._.image_caption = 1.5
    list(nlp.pipe(docs, batch_size=13))
    assert "13 more captions could not be used" in caplog.text


def test_n_process_takes_path_images_and_explains_in_memory_ones(caption_pipeline, tmp_path):
    nlp, _ = caption_pipeline
    image = tmp_path / "post.png"
    Image.new("RGB", (8, 8)).save(image)

    def docs(ref):
        result = [make_doc(nlp, text, caption) for text, caption, _ in CAPTION_POSTS]
        for doc in result:
            doc._.image = ref
        return result

    single = list(nlp.pipe(docs(image)))
    threads = one_thread_torch()
    try:
        multi = list(nlp.pipe(docs(image), n_process=2, batch_size=2))
    finally:
        torch.set_num_threads(threads)
    assert [ents(d) for d in multi] == [ents(d) for d in single]
    assert [d._.image for d in multi] == [str(image)] * len(CAPTION_POSTS)  # travels as a string
    docbin = DocBin(docs=docs(image), store_user_data=True)
    assert {d._.image for d in DocBin().from_bytes(docbin.to_bytes()).get_docs(nlp.vocab)} == {str(image)}
    # spaCy sends docs to its workers with doc.to_bytes too: the error comes at once.
    with pytest.raises(TypeError, match="save the image to a file and set doc._.image to its path"):
        list(nlp.pipe(docs(Image.new("RGB", (8, 8))), n_process=2, batch_size=2))
