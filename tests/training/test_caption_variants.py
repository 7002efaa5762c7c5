"""Caption variants: one trained pipeline scored on captions of several qualities."""
import json
import subprocess
import sys

import pytest
import spacy
from spacy.tokens import DocBin

from conftest import CAPTION_POSTS, make_examples
from spacy_agban.training.evaluation import (
    derangement, evaluate_caption_variants, first_words, make_examples as examples_of, noun_like_words,
    with_caption_variant,
)


def test_first_words_and_noun_like_words():
    caption = "a dog running on the grass near the tall trees quickly"
    assert first_words(caption) == "a dog running on the"
    assert noun_like_words(caption) == "dog grass tall trees"
    assert noun_like_words("the, a; of") == ""


@pytest.mark.parametrize("n", [2, 3, 7, 50])
def test_derangement_moves_every_post(n):
    order = derangement(n, seed=n)
    assert sorted(order) == list(range(n))
    assert all(i != j for i, j in enumerate(order))
    assert derangement(n, seed=n) == order  # seeded


def _docbin(nlp, path):
    docbin = DocBin(store_user_data=True)
    for eg in make_examples(nlp, CAPTION_POSTS):
        eg.reference._.image = "img.jpg"
        docbin.add(eg.reference)
    docbin.to_disk(path)


def test_variants_rewrite_only_the_predicted_captions(tmp_path):
    nlp = spacy.blank("en")
    _docbin(nlp, tmp_path / "posts.spacy")
    stored = [eg.predicted._.image_caption for eg in examples_of(nlp, tmp_path / "posts.spacy")]
    for variant in ("stored", "first5", "nouns", "shuffled", "none"):
        examples = with_caption_variant(examples_of(nlp, tmp_path / "posts.spacy"), variant)
        captions = [eg.predicted._.image_caption for eg in examples]
        assert [eg.reference._.image_caption for eg in examples] == stored
        assert [eg.predicted.text for eg in examples] == [eg.reference.text for eg in examples]
        if variant == "stored":
            assert captions == stored
        elif variant == "none":
            assert captions == [None] * len(stored)
            assert all(eg.predicted._.image is None for eg in examples)
        elif variant == "shuffled":
            assert sorted(captions) == sorted(stored) and all(c != s for c, s in zip(captions, stored))
        else:
            assert all(len(c.split()) <= len(s.split()) for c, s in zip(captions, stored))
    with pytest.raises(ValueError, match="caption variant must be one of"):
        with_caption_variant([], "best")


def test_a_caption_pipeline_scores_lower_on_wrong_captions(caption_pipeline, tmp_path):
    nlp, model_path = caption_pipeline
    _docbin(nlp, tmp_path / "posts.spacy")
    scores = evaluate_caption_variants(nlp, tmp_path / "posts.spacy", ["stored", "shuffled", "none"])
    assert scores["stored"]["ents_f"] == pytest.approx(1.0)
    assert scores["shuffled"]["ents_f"] < scores["stored"]["ents_f"]
    # the CLI prints one row per variant and writes the scores
    out = tmp_path / "scores.json"
    result = subprocess.run(
        [sys.executable, "-m", "spacy_agban", "evaluate", str(model_path), str(tmp_path / "posts.spacy"),
         "--captions", "stored,shuffled", "--output", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "| stored: " in result.stdout and "| shuffled: " in result.stdout
    assert set(json.loads(out.read_text())) == {"stored", "shuffled"}
    bad = subprocess.run(
        [sys.executable, "-m", "spacy_agban", "evaluate", str(model_path), str(tmp_path / "posts.spacy"),
         "--captions", "best"], capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode == 1 and "--captions takes" in bad.stderr and "Traceback" not in bad.stderr
