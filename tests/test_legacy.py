"""The former architecture names build the live architecture (spacy_agban/legacy.py)."""
import pytest
import torch
from spacy.util import fix_random_seed, registry
from thinc.api import Config

from conftest import CAPTION_POSTS, TINY_MODEL, ents, make_doc, make_examples, make_nlp, train
from spacy_agban.architectures import build_agban_model, get_module

LIVE = "spacy_agban.AGBAN.v3"
# the settings the old versions fixed, given to the live architecture explicitly
LEGACY = {
    "spacy_agban.AGBAN.v1": ({}, {"visual_dropout": 0.0, "cross_view": 0.0}),
    "spacy_agban.AGBAN.v2": ({"use_word_features": True},
                             {"use_word_features": True, "visual_dropout": 0.0, "cross_view": 0.0}),
}


def _trained(architecture: str, **settings):
    fix_random_seed(0)
    nlp = make_nlp(**{"@architectures": architecture}, **settings)
    train(nlp, make_examples(nlp, CAPTION_POSTS), steps=5)
    return nlp


@pytest.mark.parametrize("old", sorted(LEGACY))
def test_an_old_name_trains_and_tags_as_the_live_architecture(old):
    old_settings, live_settings = LEGACY[old]
    before = _trained(old, **old_settings)
    after = _trained(LIVE, **live_settings)
    assert before.get_pipe("agban").model.attrs["visual_dropout"] == 0.0
    old_state = get_module(before.get_pipe("agban").model).state_dict()
    new_state = get_module(after.get_pipe("agban").model).state_dict()
    assert old_state.keys() == new_state.keys()
    for key in old_state:
        assert torch.equal(old_state[key], new_state[key]), key
    for text, caption, _ in CAPTION_POSTS:
        assert ents(before(make_doc(before, text, caption))) == ents(after(make_doc(after, text, caption)))


def test_the_old_names_resolve_from_a_config_string():
    for old in LEGACY:
        config = Config().from_str(f'[model]\n@architectures = "{old}"\nfusion = "concat"\nadversarial = false\n')
        model = registry.resolve(config)["model"]
        assert model.attrs["fusion"] == "concat" and model.attrs["use_word_features"] is True
        assert model.attrs["cross_view"] == 0.0  # v1/v2 had none of the v3 training settings


def test_every_setting_reaches_the_torch_module_by_name():
    settings = dict(visual_dropout=0.25, source_dropout=0.1, cross_view=0.5,
                    adversarial_reduction="sum", grl_warmup_steps=7, grl_lambda=0.3)
    nlp = make_nlp(**{"@architectures": LIVE}, **settings)
    nlp.initialize(lambda: make_examples(nlp, CAPTION_POSTS))
    module = get_module(nlp.get_pipe("agban").model)
    for name, value in settings.items():
        assert getattr(module, name) == value, name
    assert module.text.chars.embed.embedding_dim == TINY_MODEL["char_dim"]
    assert module.reversal.lam == 0.3


def test_the_live_architecture_needs_token_features():
    with pytest.raises(ValueError, match="needs token features"):
        build_agban_model(use_word_features=False, char_dim=0)


def test_the_adapters_fix_what_their_version_fixed():
    # called directly: an install's entry points may name other targets for the old names
    from spacy_agban.legacy import build_agban_model_v1, build_agban_model_v2

    live = build_agban_model(fusion="ban", adversarial=False, char_dim=12).attrs
    assert build_agban_model_v1(fusion="ban", adversarial=False, char_dim=12).attrs == live
    assert build_agban_model_v2(fusion="ban", adversarial=False, char_dim=12).attrs == live
    no_words = build_agban_model_v2(use_word_features=False, char_dim=12).attrs
    assert no_words["use_word_features"] is False and no_words["visual_dropout"] == 0.0
