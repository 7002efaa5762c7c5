"""plot-training (losses and dev F1 from the JSONL log) and plot-modalities (t-SNE of G_T, G_V)."""
import json
from pathlib import Path
from typing import List

import numpy
import pytest
import spacy
import typer
from PIL import Image
from spacy.tokens import DocBin
from typer.testing import CliRunner

from conftest import CAPTION_POSTS, make_examples, make_nlp, train
from spacy_agban.cli.plots import (
    collect_projections,
    find_training_log,
    plot_modalities_command,
    plot_training_command,
    read_training_log,
)


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("plot-training")(plot_training_command)
    app.command("plot-modalities")(plot_modalities_command)
    return app


def invoke(args: List[str]):
    return CliRunner().invoke(cli(), args)


def assert_png(path: Path, min_size=(300, 200)) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_size[0] and image.height >= min_size[1]
        pixels = numpy.asarray(image.convert("L"))
    assert pixels.std() > 5, f"{path} looks blank"


# ----- plot-training ----------------------------------------------------------------------
def write_log(path: Path, adversarial: bool, truncated: bool = False) -> None:
    lines = []
    for i in range(4):
        losses = {"agban": 300.0 / (i + 1)}
        if adversarial:
            losses["agban_adv"] = 1.4 - 0.1 * i
        lines.append(json.dumps({
            "epoch": 0, "step": 400 * i, "losses": losses,
            "scores": {"ents_f": 20.0 * i, "ents_p": 1.0, "ents_r": 1.0}, "score": 0.2 * i,
        }))
    if truncated:
        lines.append('{"epoch": 1, "step": 16')  # a run still writing
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_read_training_log(tmp_path):
    write_log(tmp_path / "with.jsonl", adversarial=True, truncated=True)
    write_log(tmp_path / "without.jsonl", adversarial=False)
    curves = read_training_log(tmp_path / "with.jsonl")
    assert curves.steps == [0, 400, 800, 1200]
    assert curves.crf_loss[1] == pytest.approx(150.0)
    assert curves.adversarial_loss[3] == pytest.approx(1.1)
    assert curves.dev_f1 == pytest.approx([0.0, 0.2, 0.4, 0.6])  # logged in percent
    # Losses are sums over each eval interval (1 update before step 0, then 400).
    steps, means = zip(*curves.per_update(curves.crf_loss))
    assert steps == (0, 400, 800, 1200)
    assert means == pytest.approx([300.0, 150.0 / 400, 100.0 / 400, 75.0 / 400])
    old = read_training_log(tmp_path / "without.jsonl")
    assert not old.has_adversarial and old.adversarial_loss == [None] * 4


def test_find_training_log(tmp_path):
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    write_log(tmp_path / "runs" / "a.jsonl", adversarial=True)
    write_log(tmp_path / "b" / "log.jsonl", adversarial=True)
    assert find_training_log(tmp_path / "runs" / "a") == tmp_path / "runs" / "a.jsonl"
    assert find_training_log(tmp_path / "b") == tmp_path / "b" / "log.jsonl"
    assert find_training_log(tmp_path / "runs" / "a.jsonl") == tmp_path / "runs" / "a.jsonl"
    with pytest.raises(FileNotFoundError):
        find_training_log(tmp_path / "runs")


CONSOLE_LOG = """\x1b[38;5;4mi Saving results to training/runs/run.jsonl\x1b[0m
E    #       LOSS AGBAN  LOSS AGBAN_ADV  ENTS_F  ENTS_P  ENTS_R  SCORE 
---  ------  ----------  --------------  ------  ------  ------  ------
  0       0      346.26            1.39    0.24    0.32    0.19    0.00
  1     400    28192.05          550.10   57.56   68.88   49.44    0.58
\u2714 Saved pipeline to output directory
"""


def test_running_training_falls_back_to_the_console_log(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run.jsonl").write_text("", encoding="utf-8")  # spaCy flushes it at the end
    (tmp_path / "run.log").write_text(CONSOLE_LOG, encoding="utf-8")
    log = find_training_log(tmp_path / "run")
    assert log == tmp_path / "run.log"
    curves = read_training_log(log)
    assert curves.steps == [0, 400]
    assert curves.crf_loss == pytest.approx([346.26, 28192.05])
    assert curves.adversarial_loss == pytest.approx([1.39, 550.10])
    assert curves.dev_f1 == pytest.approx([0.0024, 0.5756])


def test_plot_training_command(tmp_path):
    (tmp_path / "agban").mkdir()
    write_log(tmp_path / "agban.jsonl", adversarial=True)
    write_log(tmp_path / "old.jsonl", adversarial=False)
    output = tmp_path / "figures" / "training.png"
    result = invoke(["plot-training", str(tmp_path / "agban"), str(tmp_path / "old.jsonl"), "-o", str(output)])
    assert result.exit_code == 0, result.output
    assert "no 'agban_adv' loss" in result.output  # the old log is reported, not fatal
    assert_png(output)


def test_plot_training_command_without_log(tmp_path):
    result = invoke(["plot-training", str(tmp_path / "nothing"), "-o", str(tmp_path / "t.png")])
    assert result.exit_code == 1 and "No training log" in result.output
    assert not (tmp_path / "t.png").exists()


# ----- plot-modalities --------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny caption-unit pipelines, with and without adversarial learning."""
    folder = tmp_path_factory.mktemp("modalities")
    paths = []
    spacy.util.fix_random_seed(0)
    for adversarial in (True, False):
        nlp = make_nlp(adversarial=adversarial)
        train(nlp, make_examples(nlp, CAPTION_POSTS), steps=1)
        path = folder / ("agban" if adversarial else "gban")
        nlp.to_disk(path)
        paths.append(path)
    return paths


def test_collect_projections_keeps_only_real_rows(models):
    nlp = spacy.load(models[0])
    posts = [("Kolo is here with friends", "a dog playing on the grass"),
             ("I love Paris", "the tower"), ("Visiting Apple today", None)]
    docs = []
    for text, caption in posts:
        doc = nlp.make_doc(text)
        doc._.image_caption = caption
        docs.append(doc)
    batch = collect_projections(nlp, docs, batch_size=3)
    assert batch.tokens.shape == (5 + 3 + 3, 16)
    assert batch.units.shape == (3 + 1, 16) and batch.unit_sources == ["caption"] * 4
    # Padding rows are dropped, not kept in place of real ones: alone gives the same rows.
    alone = [collect_projections(nlp, [doc]) for doc in docs]
    numpy.testing.assert_allclose(batch.tokens, numpy.concatenate([a.tokens for a in alone]), atol=1e-5)
    numpy.testing.assert_allclose(batch.units, numpy.concatenate([a.units for a in alone]), atol=1e-5)


def test_plot_modalities_command(models, tmp_path):
    nlp = spacy.blank("en")
    db = DocBin(store_user_data=True)
    for i in range(6):
        for text, caption, _ in CAPTION_POSTS:
            doc = nlp.make_doc(text)
            doc._.image_caption = caption
            db.add(doc)
    db.to_disk(tmp_path / "posts.spacy")
    output = tmp_path / "modalities.png"
    result = invoke(["plot-modalities", *map(str, models), str(tmp_path / "posts.spacy"),
                     "-o", str(output), "--limit", "12", "--max-points", "40", "--perplexity", "5"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.output.count("tokens,") == 2  # one panel per model
    assert_png(output, min_size=(1000, 400))
