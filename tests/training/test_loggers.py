"""The training logger: spaCy's console logger with extra loss columns, whose JSONL lines
reach the disk as they are logged (a run stopped by hand keeps its log)."""
import io

import spacy
import srsly
from spacy.training.loggers import console_logger_v3

from spacy_agban.training.loggers import _NlpWithExtraLosses, console_logger_with_extra_losses


def _nlp():
    nlp = spacy.blank("en")
    nlp.add_pipe("ner")
    nlp.config["training"]["score_weights"] = {"ents_f": 1.0, "ents_p": 0.0, "ents_r": 0.0, "speed": 0.0,
                                               "ents_per_type": None}
    return nlp


def _info(step: int) -> dict:
    return {"epoch": 0, "step": step, "score": 0.5, "losses": {"ner": 3.0, "agban_adv": 1.5},
            "other_scores": {"ents_f": 0.5, "ents_p": 0.6, "ents_r": 0.4, "speed": 1234.0}}


def test_each_line_is_on_disk_before_the_training_ends(tmp_path):
    path = tmp_path / "log.jsonl"
    log_step, finalize = console_logger_with_extra_losses(["agban_adv", "agban_cv"], output_file=path)(
        _nlp(), io.StringIO(), io.StringIO())
    log_step(_info(0))
    log_step(None)  # a step without an evaluation writes nothing
    log_step(_info(400))
    rows = list(srsly.read_jsonl(path))  # not finalized: a run killed here keeps these
    assert [row["step"] for row in rows] == [0, 400]
    assert rows[1]["losses"] == {"ner": 3.0, "agban_adv": 1.5, "agban_cv": 0.0}
    assert rows[1]["seconds"] >= rows[0]["seconds"] >= 0
    finalize()


def test_lines_are_spacy_s_lines_plus_the_elapsed_seconds(tmp_path):
    ours, theirs = tmp_path / "ours.jsonl", tmp_path / "theirs.jsonl"
    nlp = _nlp()
    log_step, finalize = console_logger_with_extra_losses(["agban_adv"], output_file=ours)(
        nlp, io.StringIO(), io.StringIO())
    spacy_step, spacy_finalize = console_logger_v3(output_file=theirs)(
        _NlpWithExtraLosses(nlp, ["agban_adv"]), io.StringIO(), io.StringIO())
    for step in (0, 400):
        log_step(_info(step))
        spacy_step(_info(step))
    finalize()
    spacy_finalize()
    rows = list(srsly.read_jsonl(ours))
    assert all(isinstance(row.pop("seconds"), float) for row in rows)
    assert rows == list(srsly.read_jsonl(theirs))


def test_a_log_already_there_is_kept(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 7}\n', encoding="utf-8")
    out = io.StringIO()
    log_step, finalize = console_logger_with_extra_losses(output_file=path)(_nlp(), out, io.StringIO())
    log_step(_info(0))
    finalize()
    assert path.read_text(encoding="utf-8") == '{"step": 7}\n'
    assert "Saving logs is disabled" in out.getvalue()
