"""The benchmarks' own logic: the quality bench's runs and tables, the speed bench's
pipelines and report, the memory bench's trainings, the decoding choice's report, and the
posts they all read."""
import signal
import subprocess
import sys

import pytest
import srsly
import typer
from spacy.tokens import DocBin

from benchmarks import _common, decoding_choice, memory, quality, speed

from conftest import CAPTION_POSTS, make_examples, make_nlp


# ----- reports ---------------------------------------------------------------------------
def record(row, seed, dev_f, test_f, k=None):
    return {
        "row": row, "seed": seed, "k": k, "name": f"{row}-s{seed}", "model": f"x/{row}/model-best",
        "existing": False, "overrides": {}, "dev": {"ents_f": dev_f},
        "test_scores": {"ents_p": test_f, "ents_r": test_f, "ents_f": test_f},
        "test_per_type": {"PER": {"p": test_f, "r": test_f, "f": test_f}},
    }


def test_parse_existing():
    run = quality.parse_existing("training/runs/agban-s0=agban:0")
    assert (run.row, run.seed, str(run.existing)) == ("agban", 0, "training/runs/agban-s0")
    for bad in ("training/runs/agban-s0=agban", "agban:0", "training/runs/agban-s0=agban:zero"):
        with pytest.raises(typer.BadParameter, match="PATH=ROW:SEED"):
            quality.parse_existing(bad)


def test_best_row_is_chosen_on_dev_not_test():
    records = [record("a", 0, 0.70, 0.60), record("a", 1, 0.72, 0.62),
               record("b", 0, 0.65, 0.90), record("a", 0, 0.99, 0.99, k=4)]
    assert quality.best_on_dev(records) == "a"


def test_quality_table_mean_and_std():
    table = quality.quality_table([record("a", 0, 0.7, 0.60), record("a", 1, 0.7, 0.62)])
    assert "61.00 ± 1.41" in table and "| a | 0,1 |" in table


def test_k_table_includes_the_rows_own_runs_at_their_config_top_k(tmp_path):
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    for rec in (record("agban", 0, 0.7, 0.60), record("agban", 0, 0.7, 0.50, k=1),
                record("bilstm_crf", 0, 0.7, 0.55)):
        srsly.write_json(metrics / f"{rec['name']}-{rec['k']}.json", rec)
    text = quality.write_report(metrics, tmp_path / "quality.md")
    k_table = text.split("## Caption units per post")[1]
    top_k = quality.config_top_k("agban")
    assert top_k is not None and f"| agban (k={top_k}) | 0 |" in k_table
    assert "| agban (k=1) | 0 |" in k_table and "bilstm_crf" not in k_table


def test_finished_training_needs_the_log(tmp_path):
    (tmp_path / "run" / "model-best").mkdir(parents=True)
    log = tmp_path / "run.log"
    log.write_text("E  #\n  1  400  ...\n")
    assert not quality.training_finished(log, tmp_path / "run" / "model-best")
    log.write_text("...\n✔ Saved pipeline to output directory\n")
    assert quality.training_finished(log, tmp_path / "run" / "model-best")


def test_set_override_needs_key_and_value(tmp_path):
    from typer.testing import CliRunner

    result = CliRunner().invoke(quality.app, [
        "--rows", "agban", "--seeds", "0", "--set", "paths.transformer",
        "--output-dir", str(tmp_path), "--metrics-dir", str(tmp_path / "m"), "--report", str(tmp_path / "q.md"),
    ])
    assert result.exit_code != 0 and "KEY=VALUE" in result.output
    assert not (tmp_path / "m").exists()  # refused before any training


def test_quality_table_shows_the_score_without_visual_context():
    with_column = record("a", 0, 0.7, 0.60)
    with_column["test_no_context"] = {"ents_p": 0.5, "ents_r": 0.5, "ents_f": 0.55}
    with_column["dev_two_ways"] = {"without_context": {"ents_f": 0.52}}
    table = quality.quality_table([with_column, record("b", 0, 0.7, 0.60)])
    assert "| a | 0 | 60.00 | 60.00 | 60.00 | 55.00 | 70.00 | 52.00 |" in table
    assert "| b | 0 | 60.00 | 60.00 | 60.00 | — | 70.00 | — |" in table
    older = record("a", 1, 0.7, 0.60)  # a run from before the column: left out, seeds named
    table = quality.quality_table([with_column, older])
    assert "| 55.00 (seed 0) |" in table


def test_rows_are_configs_or_their_variants(tmp_path):
    configs = quality.ROOT / "configs"
    assert quality.row_config("concat") == (configs / "concat.cfg", {})
    path, overrides = quality.row_config("bilstm_crf")
    assert path.name == "concat.cfg" and overrides["components.agban.model.fusion"] == "none"
    # the agban row is the paper's model, as every other use of the name
    path, overrides = quality.row_config("agban")
    assert path.name == "concat.cfg"
    assert overrides == {"components.agban.model.fusion": "gban", "components.agban.model.adversarial": True}
    assert quality.config_top_k("concat_paper") == quality.config_top_k("agban") == 8
    assert quality.config_top_k("bilstm_crf") is None  # the variant has no caption units
    with pytest.raises(typer.BadParameter, match="no model 'nope'"):
        quality.row_config("nope")


def test_a_training_started_by_the_memory_bench_can_be_stopped_with_sigint():
    """Started from a background job (SIGINT ignored), the child still turns SIGINT into
    KeyboardInterrupt, so spaCy's training loop saves model-last when stopped by hand."""
    probe = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        inherited = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        restored = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True,
            preexec_fn=memory._interruptible,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    assert inherited.stdout.strip() == "False"  # the trap the helper avoids
    assert restored.stdout.strip() == "True"


def test_decoding_choice_reports_each_value_and_the_best_mean():
    def column(*f1s):
        return {v: {"ents_f": f} for v, f in zip(("0.0", "0.5"), f1s)}

    results = {
        "a": {"with_context": column(0.70, 0.72), "without_context": column(0.69, 0.70)},
        "b": {"with_context": column(0.72, 0.71), "without_context": column(0.70, 0.70)},
    }
    text = decoding_choice.report(results, ["0.0", "0.5"])
    assert "| `a` | 70.00 | 69.00 | 72.00 | 70.00 |" in text
    assert "| mean (2 models) | 71.00 | 69.50 | 71.50 | 70.00 |" in text
    assert "0.0: 70.25, 0.5: 70.75. Best: **0.5**." in text
    assert "Best" not in decoding_choice.report(results, ["0.0", "0.5"], choice=False)
    assert [decoding_choice.parse_value(v) for v in ("true", "False", "0.45")] == [True, False, 0.45]
    with pytest.raises(ValueError):
        decoding_choice.parse_value("half")


def test_speed_times_each_pipeline_on_both_revisions_and_spacy_ner_once(tmp_path):
    specs = speed.specs_of("default,accurate", [], ["bf16"], True, old=tmp_path)
    assert [s.name for s in specs] == [
        "default@baseline", "default", "accurate@baseline", "accurate", "accurate-bf16", "spacy_ner",
    ]
    assert {s.tree for s in specs if s.name.endswith("@baseline")} == {tmp_path}
    assert {s.tree for s in specs if not s.name.endswith("@baseline")} == {speed.ROOT}
    assert [s.precision for s in specs] == ["fp32"] * 4 + ["bf16", "fp32"]
    assert [s.name for s in speed.specs_of("default", [], [], False, None)] == ["default"]
    model = speed.specs_of("", [f"mine={tmp_path}"], [], True, None)[0]
    assert (model.name, model.model, model.config) == ("mine", str(tmp_path), "")
    with pytest.raises(typer.BadParameter, match="--pipelines"):
        speed.specs_of("nope", [], [], True, None)
    with pytest.raises(typer.BadParameter, match="NAME=PATH"):
        speed.specs_of("", [f"mine={tmp_path / 'missing'}"], [], True, None)


def test_speed_report_gives_words_per_second_against_spacy_ner():
    def entry(batch1: float, pipe: float) -> dict:
        return {"words": 100, "rss_peak_mb": 900.0, "batch1": {"seconds": batch1}, "pipe": {"seconds": pipe}}

    result = {
        "new": "abc1234", "baseline": "def5678", "docs": 10, "reps": 3, "batch_size": 64,
        "load_average": [1.0], "wall_s": 60.0, "same_entities": {"default": True},
        "pipelines": {"default@baseline": entry(2.0, 0.5), "default": entry(1.0, 0.25),
                      "accurate": entry(4.0, 2.0), "accurate-bf16": entry(2.0, 1.0), "spacy_ner": entry(1.0, 0.5)},
        "docs_with_fp32_entities": {"accurate-bf16": 0.9},
    }
    text = speed.markdown(result)
    assert "# Inference speed: abc1234 against def5678" in text
    assert "| default | 10.0 | 100 | 40.0 | 400 | 1.00x / 2.00x |  | 900 |" in text
    assert "| accurate-bf16 | 5.0 | 50 | 10.0 | 100 | 0.50x / 0.50x |  | 900 |" in text
    assert "- default batch1: new / baseline = 2.00x" in text
    assert "- default: same entities as the baseline on every doc: True" in text
    assert "- accurate bf16 pipe: / fp32 = 2.00x" in text
    assert "docs with the same entities as fp32: 90.0%" in text


def test_timed_posts_carry_their_visual_context_and_no_annotation(tmp_path):
    nlp = make_nlp()
    examples = make_examples(nlp, CAPTION_POSTS)
    nlp.initialize(lambda: examples)
    references = [eg.reference for eg in examples]
    assert any(doc.ents for doc in references)
    path = tmp_path / "posts.spacy"
    DocBin(docs=references, store_user_data=True).to_disk(path)
    docs = _common.fresh_docs(nlp, path, limit=2)
    assert [d.text for d in docs] == [r.text for r in references[:2]]
    assert [d._.image_caption for d in docs] == [r._.image_caption for r in references[:2]]
    assert not any(d.ents for d in docs)
    seconds, tagged = _common.time_pipe(nlp, docs, batch_size=2)
    assert seconds > 0 and len(tagged) == 2 and not any(d.ents for d in docs)  # copies were tagged


def test_a_baseline_worker_registers_from_its_own_package_not_this_trees_entry_points(monkeypatch):
    """An earlier revision's worker must not load this tree's modules through the installed
    entry points (catalogue prefers them to the names the revision registers itself)."""
    import catalogue
    from spacy.util import registry

    monkeypatch.setattr(catalogue.Registry, "_get_entry_points", catalogue.Registry._get_entry_points)
    before = [e.value for e in registry.architectures._get_entry_points()]
    assert any(v.startswith("spacy_agban") for v in before)
    _common.ignore_installed_entry_points()
    after = [e.value for e in registry.architectures._get_entry_points()]
    assert after == [v for v in before if not v.startswith("spacy_agban")]
