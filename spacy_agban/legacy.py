"""Former names of the AGBAN architecture, kept so that saved pipelines load.

spaCy keeps one live version of each architecture and moves the older ones to
spacy-legacy; this module does the same for spacy-agban. ``spacy_agban.AGBAN.v3``
(``architectures.build_agban_model``) is the live architecture: a pipeline's
``config.cfg`` that names ``AGBAN.v1`` or ``AGBAN.v2`` builds it through the thin
adapters below, with each old signature and the settings the old version fixed.
Nothing else lives here, and new configs should name ``spacy_agban.AGBAN.v3``.

- ``AGBAN.v1``: the paper's model; always uses the word features, none of the
  training settings for posts without visual context.
- ``AGBAN.v2``: v1 with the ``use_word_features`` switch.
"""
from typing import List, Optional

from spacy.tokens import Doc
from spacy.util import registry
from thinc.api import Model
from thinc.types import Floats2d

from .architectures import AGBANInput, build_agban_model
from .model.agban import Output


@registry.architectures("spacy_agban.AGBAN.v1")
def build_agban_model_v1(
    fusion: str = "gban",
    adversarial: bool = True,
    grl_lambda: float = 1.0,
    word_dim: int = 50,
    char_dim: int = 30,
    char_hidden: int = 50,
    hidden: int = 200,
    gban_dim: int = 200,
    gate_dim: int = 200,
    discriminator_hidden: int = 200,
    dropout: float = 0.5,
    max_word_chars: int = 20,
    token_encoder: Optional[Model[List[Doc], List[Floats2d]]] = None,
    mixed_precision: bool = False,
) -> Model[AGBANInput, Output]:
    """``spacy_agban.AGBAN.v1``: the live architecture with its v1 settings."""
    return build_agban_model(
        fusion=fusion, adversarial=adversarial, grl_lambda=grl_lambda, word_dim=word_dim,
        char_dim=char_dim, char_hidden=char_hidden, hidden=hidden, gban_dim=gban_dim,
        gate_dim=gate_dim, discriminator_hidden=discriminator_hidden, dropout=dropout,
        max_word_chars=max_word_chars, token_encoder=token_encoder,
        mixed_precision=mixed_precision,
    )


@registry.architectures("spacy_agban.AGBAN.v2")
def build_agban_model_v2(
    fusion: str = "gban",
    adversarial: bool = True,
    grl_lambda: float = 1.0,
    use_word_features: bool = True,
    word_dim: int = 50,
    char_dim: int = 30,
    char_hidden: int = 50,
    hidden: int = 200,
    gban_dim: int = 200,
    gate_dim: int = 200,
    discriminator_hidden: int = 200,
    dropout: float = 0.5,
    max_word_chars: int = 20,
    token_encoder: Optional[Model[List[Doc], List[Floats2d]]] = None,
    mixed_precision: bool = False,
) -> Model[AGBANInput, Output]:
    """``spacy_agban.AGBAN.v2``: the live architecture with its v2 settings."""
    return build_agban_model(
        fusion=fusion, adversarial=adversarial, grl_lambda=grl_lambda,
        use_word_features=use_word_features, word_dim=word_dim, char_dim=char_dim,
        char_hidden=char_hidden, hidden=hidden, gban_dim=gban_dim, gate_dim=gate_dim,
        discriminator_hidden=discriminator_hidden, dropout=dropout,
        max_word_chars=max_word_chars, token_encoder=token_encoder,
        mixed_precision=mixed_precision,
    )
