"""The reliability table of the entities' confidences (predicted confidence vs observed precision)."""
import json

import pytest
import spacy
from spacy.tokens import DocBin
from spacy.training import Example
from typer.testing import CliRunner

from conftest import CAPTION_POSTS, make_examples
from spacy_agban.cli import app
from spacy_agban.training.calibration import (
    entity_outcomes, expected_calibration_error, reliability_both, reliability_table,
)


def test_entities_are_binned_by_confidence_and_scored_against_the_gold():
    rows = reliability_table([(0.05, False), (0.15, True), (0.95, True), (0.96, False), (1.0, True)], bins=10)
    assert [(r["low"], r["entities"], r["precision"]) for r in rows] == [
        (0.0, 1, 0.0), (0.1, 1, 1.0), (0.9, 3, pytest.approx(2 / 3))]
    assert rows[2]["mean_confidence"] == pytest.approx((0.95 + 0.96 + 1.0) / 3)
    gaps = 1 * 0.05 + 1 * 0.85 + 3 * abs((0.95 + 0.96 + 1.0) / 3 - 2 / 3)
    assert expected_calibration_error(rows) == pytest.approx(gaps / 5)
    with pytest.raises(ValueError, match="at least one bin"):
        reliability_table([], bins=0)


def test_an_entity_is_right_only_with_its_exact_characters_and_label(caption_pipeline):
    nlp, _ = caption_pipeline
    reference = make_examples(nlp, CAPTION_POSTS[:1])[0].reference  # "Kolo" MISC at 0-4
    predicted = nlp.make_doc(reference.text)
    predicted.ents = [predicted.char_span(0, 4, "PER"), predicted.char_span(5, 12, "MISC")]
    with pytest.raises(ValueError, match="store_confidence"):
        entity_outcomes([Example(predicted, reference)])
    predicted = nlp.make_doc(reference.text)
    predicted._.image_caption = reference._.image_caption
    predicted = nlp(predicted)
    assert [right for _, right in entity_outcomes([Example(predicted, reference)])] == [True]


def test_evaluate_prints_and_writes_the_table_of_both_columns(caption_pipeline, tmp_path):
    nlp, model = caption_pipeline
    docbin = DocBin(store_user_data=True, docs=[eg.reference for eg in make_examples(nlp, CAPTION_POSTS)])
    docbin.to_disk(tmp_path / "posts.spacy")
    tables = reliability_both(nlp, tmp_path / "posts.spacy", bins=4)
    overfit = tables["with_context"]
    assert sum(r["entities"] for r in overfit) == 4 and all(r["precision"] == 1.0 for r in overfit)
    assert nlp.get_pipe("agban").store_confidence  # put back as it was
    result = CliRunner().invoke(app, ["evaluate", str(model), str(tmp_path / "posts.spacy"),
                                      "--reliability", "4", "--output", str(tmp_path / "scores.json")])
    assert result.exit_code == 0, result.output
    assert "Reliability, visual context removed" in result.output
    written = json.loads((tmp_path / "scores.json").read_text())
    assert [r["entities"] for r in written["reliability"]["with_context"]] == [r["entities"] for r in overfit]
    bad = CliRunner().invoke(app, ["evaluate", str(model), str(tmp_path / "posts.spacy"), "--reliability", "-1"])
    assert bad.exit_code == 1 and "--reliability takes a number of bins" in bad.output
