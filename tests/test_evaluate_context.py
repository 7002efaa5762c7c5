"""`spacy evaluate` and the training reader must see doc._.image / doc._.image_caption."""
import pytest
from spacy.cli.evaluate import evaluate
from spacy.tokens import DocBin
from spacy.training import Corpus

from conftest import CAPTION_POSTS, make_examples
from spacy_agban.corpus import create_visual_corpus_reader


def _write_docbin(nlp, path, with_captions: bool):
    docbin = DocBin(store_user_data=True)
    for eg in make_examples(nlp, CAPTION_POSTS):
        doc = eg.reference
        if not with_captions:
            doc._.image_caption = None
        docbin.add(doc)
    docbin.to_disk(path)


def test_spacy_evaluate_scores_with_the_stored_visual_context(caption_pipeline, tmp_path):
    nlp, model_path = caption_pipeline
    explicit = nlp.evaluate(make_examples(nlp, CAPTION_POSTS))["ents_f"]
    assert explicit == pytest.approx(1.0)

    _write_docbin(nlp, tmp_path / "with.spacy", with_captions=True)
    _write_docbin(nlp, tmp_path / "without.spacy", with_captions=False)
    with_context = evaluate(str(model_path), tmp_path / "with.spacy", silent=True)["ents_f"]
    without_context = evaluate(str(model_path), tmp_path / "without.spacy", silent=True)["ents_f"]
    assert with_context == pytest.approx(explicit)
    assert without_context < with_context


def test_readers_copy_the_context_to_predicted_docs(caption_pipeline, tmp_path):
    nlp, _ = caption_pipeline
    _write_docbin(nlp, tmp_path / "with.spacy", with_captions=True)
    for reader in (create_visual_corpus_reader(tmp_path / "with.spacy"), Corpus(tmp_path / "with.spacy")):
        examples = list(reader(nlp))
        assert [eg.predicted._.image_caption for eg in examples] == [c for _, c, _ in CAPTION_POSTS]
        assert all(eg.predicted is not eg.reference for eg in examples)
