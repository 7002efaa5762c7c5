"""`spacy evaluate` and the training reader must see doc._.image / doc._.image_caption."""
import os
import subprocess
import sys
from typing import Dict, List, Tuple

import pytest
import spacy
from spacy.cli.evaluate import evaluate
from spacy.tokens import Doc, DocBin
from spacy.training import Corpus

from conftest import CAPTION_POSTS, ROOT, make_examples
from spacy_agban.training.corpus import create_visual_corpus_reader, patch_stock_corpus


def _env_with_repo() -> Dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


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
    patch_stock_corpus()  # the stock Corpus keeps the context only for those who opt in
    _write_docbin(nlp, tmp_path / "with.spacy", with_captions=True)
    for reader in (create_visual_corpus_reader(tmp_path / "with.spacy"), Corpus(tmp_path / "with.spacy")):
        examples = list(reader(nlp))
        assert [eg.predicted._.image_caption for eg in examples] == [c for _, c, _ in CAPTION_POSTS]
        assert all(eg.predicted is not eg.reference for eg in examples)


def _sentence_split_docbin(path) -> List[Tuple[str, str]]:
    """Two posts of two sentences each, with an image and a caption; (image, caption) per post."""
    nlp = spacy.blank("en")
    docbin = DocBin(store_user_data=True)
    context = [("1.jpg", "a dog on the grass"), ("2.jpg", "the eiffel tower at night")]
    for i, (image, caption) in enumerate(context):
        doc = Doc(nlp.vocab, words=["Kolo", "is", "here", ".", "Paris", "too", "."],
                  sent_starts=[True, False, False, False, True, False, False],
                  ents=["B-PER", "O", "O", "O", "B-LOC", "O", "O"])
        doc._.image = image
        doc._.image_caption = caption
        docbin.add(doc)
    docbin.to_disk(path)
    return context


@pytest.mark.parametrize("options", [{"max_length": 5}, {"gold_preproc": True}])
@pytest.mark.parametrize("reader", ["spacy_agban", "stock"])
def test_sentences_split_from_a_post_keep_its_context(caption_pipeline, tmp_path, reader, options):
    # spaCy makes the sentences with Span.as_doc(), which drops user_data; the stock
    # Corpus keeps the context once patched (spacy evaluate's path, or opted in)
    nlp, _ = caption_pipeline
    patch_stock_corpus()
    context = _sentence_split_docbin(tmp_path / "sents.spacy")
    make = create_visual_corpus_reader if reader == "spacy_agban" else Corpus
    examples = list(make(tmp_path / "sents.spacy", **options)(nlp))
    assert [len(eg.reference) for eg in examples] == [4, 3, 4, 3]
    expected = [pair for pair in context for _ in range(2)]
    for doc_of in (lambda eg: eg.reference, lambda eg: eg.predicted):
        assert [(doc_of(eg)._.image, doc_of(eg)._.image_caption) for eg in examples] == expected


@pytest.mark.slow
def test_only_spacy_evaluate_or_an_explicit_opt_in_patches_spacys_corpus(caption_pipeline, tmp_path):
    # a fresh process: neither the training reader nor building or loading an agban
    # pipe changes spaCy's Corpus; spacy evaluate's path does, and so does the opt-in
    _, model_path = caption_pipeline
    nlp = spacy.load(model_path)
    _write_docbin(nlp, tmp_path / "with.spacy", with_captions=True)
    code = (
        "import spacy, spacy_agban\n"
        "from spacy.training import Corpus\n"
        "from spacy.cli.evaluate import evaluate\n"
        "from spacy_agban.training.corpus import create_visual_corpus_reader, patch_stock_corpus\n"
        "stock = Corpus.make_examples\n"
        "create_visual_corpus_reader('with.spacy')\n"
        "spacy.blank('en').add_pipe('agban')\n"
        f"nlp = spacy.load({str(model_path)!r})\n"
        "assert Corpus.make_examples is stock\n"
        "examples = list(Corpus('with.spacy')(nlp))\n"
        "assert all(eg.predicted._.image_caption is None for eg in examples)\n"
        f"scores = evaluate({str(model_path)!r}, 'with.spacy', silent=True)\n"
        "assert Corpus.make_examples is not stock\n"
        "assert all(eg.predicted._.image_caption for eg in Corpus('with.spacy')(nlp))\n"
        "print(scores['ents_f'])\n"
    )
    run = subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path,
                         env=_env_with_repo(), capture_output=True, text=True, timeout=300)
    # the score of the posts with their captions, as in the test above
    assert float(run.stdout.split()[-1]) == pytest.approx(nlp.evaluate(make_examples(nlp, CAPTION_POSTS))["ents_f"])
    opt_in = (
        "import spacy_agban\n"
        "from spacy.training import Corpus\n"
        "from spacy_agban.training.corpus import patch_stock_corpus\n"
        "stock = Corpus.make_examples\n"
        "patch_stock_corpus()\n"
        "assert Corpus.make_examples is not stock\n"
    )
    subprocess.run([sys.executable, "-c", opt_in], check=True, cwd=tmp_path, env=_env_with_repo(), timeout=300)


def test_a_changed_spacy_corpus_is_an_error_not_a_silent_loss(monkeypatch):
    def make_examples(self, nlp, reference_docs, extra):  # a spaCy that changed the method
        return iter(())

    monkeypatch.setattr(Corpus, "make_examples", make_examples)
    with pytest.raises(RuntimeError, match="builds examples differently"):
        patch_stock_corpus()
