"""``spacy_agban.AGBAN.v3``: every setting of the config reaches the torch module by name."""
import pytest

from conftest import CAPTION_POSTS, TINY_MODEL, make_examples, make_nlp
from spacy_agban.architectures import build_agban_model, get_module


def test_every_setting_reaches_the_torch_module_by_name():
    settings = dict(visual_dropout=0.25, source_dropout=0.1, cross_view=0.5,
                    adversarial_reduction="sum", grl_warmup_steps=7, grl_lambda=0.3)
    nlp = make_nlp(**{"@architectures": "spacy_agban.AGBAN.v3"}, **settings)
    nlp.initialize(lambda: make_examples(nlp, CAPTION_POSTS))
    module = get_module(nlp.get_pipe("agban").model)
    for name, value in settings.items():
        assert getattr(module, name) == value, name
    assert module.text.chars.embed.embedding_dim == TINY_MODEL["char_dim"]
    assert module.reversal.lam == 0.3


def test_the_architecture_needs_token_features():
    with pytest.raises(ValueError, match="needs token features"):
        build_agban_model(use_word_features=False, char_dim=0)
