"""A tiny AGBAN torch module, shared by the model and pipeline tests."""
from spacy_agban.model import AGBANModule
import torch


def tiny_module(**overrides) -> AGBANModule:
    torch.manual_seed(0)
    kwargs = dict(
        n_tags=5, n_words=10, static_width=4, word_dim=4, n_chars=1024, char_dim=4,
        char_hidden=3, hidden=8, unit_dims={"caption": 4}, fusion="gban", adversarial=True,
        grl_lambda=1.0, gban_dim=5, gate_dim=5, discriminator_hidden=6, dropout=0.0,
    )
    kwargs.update(overrides)
    return AGBANModule(**kwargs).eval()
