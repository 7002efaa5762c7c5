"""The explain command: recorded attention, the HTML report, the heatmap PNG."""
import hashlib
import re
import shutil
import subprocess
from pathlib import Path
from typing import List

import numpy
import pytest
import spacy
import typer
from PIL import Image
from spacy.tokens import DocBin
from typer.testing import CliRunner

from conftest import CAPTION_POSTS, TINY_MODEL, make_examples, make_nlp, train
from spacy_agban.cli.explain import (
    BOX_COLOURS,
    draw_objects,
    explain_command,
    load_pipeline,
    recorded_attention,
)

IMAGE_COLOUR = (200, 30, 160)  # a magenta found nowhere else in a report
SIGNATURE = "test-detector"


def make_image(path: Path, size=(320, 240)) -> Path:
    Image.new("RGB", size, IMAGE_COLOUR).save(path, format="JPEG", quality=95)
    return path


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("explain")(explain_command)
    app.command("unused")(lambda: None)  # two commands: typer keeps the subcommand name
    return app


def run_explain(args: List[str]):
    result = CliRunner().invoke(cli(), ["explain", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def caption_model(tmp_path_factory) -> Path:
    """A tiny caption-unit AGBAN pipeline after a few updates (attention needs no fit)."""
    spacy.util.fix_random_seed(0)
    nlp = make_nlp()
    train(nlp, make_examples(nlp, CAPTION_POSTS), steps=3)
    path = tmp_path_factory.mktemp("explain") / "model"
    nlp.to_disk(path)
    return path


@pytest.fixture(scope="module")
def object_model(tmp_path_factory):
    """A tiny pipeline with object units read from a feature store (no detector)."""
    folder = tmp_path_factory.mktemp("explain_objects")
    image = make_image(folder / "post.jpg")
    from spacy_agban.detection.store import Detections, FeatureStore

    rng = numpy.random.default_rng(0)
    detections = Detections(
        features=rng.normal(size=(2, 1024)).astype("float32"),
        labels=["person", "dog"],
        scores=numpy.asarray([0.9, 0.7], dtype="float32"),
        boxes=numpy.asarray([[20, 20, 150, 200], [170, 60, 300, 220]], dtype="float32"),
    )
    store = FeatureStore(folder / "store.sqlite")
    store.put(hashlib.sha256(image.read_bytes()).hexdigest(), SIGNATURE, detections)
    store.close()
    object_units = {"@misc": "spacy_agban.ObjectUnits.v1", "store": str(folder / "store.sqlite"),
                    "signature": SIGNATURE, "top_k": 3}
    spacy.util.fix_random_seed(0)
    nlp = make_nlp()  # the tiny model and vectors; its agban pipe is swapped for one with objects
    nlp.remove_pipe("agban")
    nlp.add_pipe("agban", config={
        "model": {**TINY_MODEL, "fusion": "gban", "adversarial": True},  # attention to draw
        "caption_units": {"@misc": "spacy_agban.CaptionUnits.v1", "top_k": 3},
        "object_units": object_units,
    })
    examples = make_examples(nlp, CAPTION_POSTS)
    for eg in examples[:2]:
        eg.predicted._.image = str(image)
        eg.reference._.image = str(image)
    train(nlp, examples, steps=2)
    nlp.to_disk(folder / "model")
    return folder / "model", image


# ----- recorded attention -----------------------------------------------------------------
def mixed_batch(nlp):
    """Docs with 3 caption units, 1 and none, in one batch (padding in both dimensions)."""
    posts = [
        ("Kolo is here with friends", "a dog playing on the grass"),
        ("I love Paris", "the tower"),
        ("Visiting Apple today", None),
    ]
    docs = []
    for text, caption in posts:
        doc = nlp.make_doc(text)
        doc._.image_caption = caption
        docs.append(doc)
    return docs


def test_load_pipeline_records_attention(caption_model):
    assert spacy.load(caption_model).get_pipe("agban").record_attention is False
    assert load_pipeline(caption_model).get_pipe("agban").record_attention is True


def test_attention_rows_sum_to_one_over_real_units(caption_model):
    nlp = load_pipeline(caption_model)
    batch = list(nlp.pipe(mixed_batch(nlp), batch_size=3))
    expected_units = [["dog", "playing", "grass"], ["tower"], []]
    for doc, labels in zip(batch, expected_units):
        units, attention, _ = recorded_attention(doc)
        assert [u["label"] for u in units] == labels
        assert attention.shape == (len(doc), len(labels))
        if labels:
            numpy.testing.assert_allclose(attention.sum(axis=1), 1.0, atol=1e-5)
            assert (attention >= 0).all()
    # Padding is ignored: each doc gets the same map in the mixed batch as alone.
    for doc, alone in zip(batch, mixed_batch(nlp)):
        _, alone_attention, alone_gate = recorded_attention(nlp(alone))
        _, attention, gate = recorded_attention(doc)
        numpy.testing.assert_allclose(attention, alone_attention, atol=1e-5)
        numpy.testing.assert_allclose(gate, alone_gate, atol=1e-5)


def test_gate_values_in_unit_interval(caption_model):
    nlp = load_pipeline(caption_model)
    for doc in nlp.pipe(mixed_batch(nlp), batch_size=3):
        _, _, gate = recorded_attention(doc)
        assert gate is not None and gate.shape == (len(doc),)
        assert ((gate >= 0.0) & (gate <= 1.0)).all()


# ----- the command ------------------------------------------------------------------------
def data_uris_only(html: str) -> bool:
    """No resource of the page is fetched from anywhere: every src is a data URI."""
    sources = re.findall(r"""\ssrc=['"]([^'"]*)['"]""", html)
    return all(s.startswith("data:") for s in sources) and "<link" not in html and "<script" not in html


@pytest.mark.parametrize("kind", ["image", "caption", "neither"])
def test_explain_command_writes_report_and_png(caption_model, tmp_path, kind):
    args = [str(caption_model), "-o", str(tmp_path / "out"), "--text", "Kolo is here <b>!", "--name", kind]
    if kind == "image":
        args += ["--image", str(make_image(tmp_path / "post.jpg")), "--caption", "a dog playing on the grass"]
    elif kind == "caption":
        args += ["--caption", "a dog playing on the grass"]
    run_explain(args)
    html = (tmp_path / "out" / f"{kind}.html").read_text(encoding="utf-8")
    with Image.open(tmp_path / "out" / f"{kind}.attention.png") as png:
        assert png.format == "PNG" and png.width > 100 and png.height > 100
    assert data_uris_only(html)
    assert "<b>" not in html and "&lt;" in html  # the post's text is escaped
    assert ("data:image/jpeg;base64," in html) == (kind == "image")
    assert ("<span>grass</span>" in html) == (kind != "neither")  # the caption units
    assert "class='heat'" in html and "<th>gate</th>" in html
    if kind == "neither":
        assert "no visual units" in html


def test_explain_command_reads_docs(caption_model, tmp_path):
    nlp = spacy.blank("en")
    images = tmp_path / "images"
    images.mkdir()
    make_image(images / "7.jpg")
    db = DocBin(store_user_data=True)
    for i, (text, caption, entities) in enumerate(CAPTION_POSTS):
        doc = nlp.make_doc(text)
        doc.ents = [doc.char_span(s, e, label=label) for s, e, label in entities]
        doc._.image = f"{i + 5}.jpg"  # only 7.jpg exists
        doc._.image_caption = caption
        doc.user_data["image_id"] = f"{i + 5}.jpg"
        db.add(doc)
    db.to_disk(tmp_path / "posts.spacy")
    out = tmp_path / "out"
    run_explain([str(caption_model), "-o", str(out), "--docs", str(tmp_path / "posts.spacy"),
                 "--image-root", str(images), "--limit", "3"])
    assert sorted(p.name for p in out.glob("*.html")) == [
        "000-5.html", "001-6.html", "002-7.html", "index.html"]
    assert len(list(out.glob("*.attention.png"))) == 3
    with_image = (out / "002-7.html").read_text(encoding="utf-8")
    assert "data:image/jpeg;base64," in with_image and "Gold entities" in with_image
    assert "file not found" in (out / "000-5.html").read_text(encoding="utf-8")  # says why no image
    selected = tmp_path / "selected"
    run_explain([str(caption_model), "-o", str(selected), "--docs", str(tmp_path / "posts.spacy"),
                 "--image-id", "6", "--image-id", "8.jpg"])
    assert sorted(p.name for p in selected.glob("*.html")) == ["000-6.html", "001-8.html", "index.html"]


def test_explain_command_rejects_bad_arguments(caption_model, tmp_path):
    runner = CliRunner()
    neither = runner.invoke(cli(), ["explain", str(caption_model)])
    assert neither.exit_code == 1 and "either --text" in neither.output
    missing = runner.invoke(cli(), ["explain", str(caption_model), "--text", "hi", "--image", str(tmp_path / "no.jpg")])
    assert missing.exit_code == 1 and "does not exist" in missing.output


def test_object_boxes_are_drawn_where_the_units_say():
    image = Image.new("RGB", (200, 100), "white")
    units = [
        {"source": "object", "label": "person", "score": 0.9, "box": [20.0, 40.0, 120.0, 180.0]},
        {"source": "caption", "label": "dog", "score": None, "box": None},
    ]
    drawn = draw_objects(image, units, scale=(0.5, 0.5))  # boxes are in original coordinates
    colour = Image.new("RGB", (1, 1), BOX_COLOURS[0]).getpixel((0, 0))
    assert drawn.getpixel((10, 60)) == colour  # left edge at x = 20 * 0.5
    assert drawn.getpixel((35, 60)) == (255, 255, 255)  # inside the box: untouched
    assert image.getpixel((10, 60)) == (255, 255, 255)  # the original is not drawn on


def test_explain_with_object_units_draws_their_boxes(object_model, tmp_path):
    model, image = object_model
    run_explain([str(model), "-o", str(tmp_path), "--text", "Kolo is here", "--image", str(image),
                 "--caption", "a dog playing on the grass", "--name", "objects"])
    html = (tmp_path / "objects.html").read_text(encoding="utf-8")
    assert "2 detected object(s) drawn" in html
    assert "[1] person" in html and "[2] dog" in html  # heatmap columns: objects, then caption
    assert "<span>grass</span>" in html


# ----- the report in a browser ------------------------------------------------------------
CHROMIUM_NAMES = ("chromium", "chromium-browser")


def find_chromium():
    return next((shutil.which(n) for n in CHROMIUM_NAMES if shutil.which(n)), None)


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium, installed with apt-get if missing (skip if that fails)."""
    found = find_chromium()
    if found is None and shutil.which("apt-get"):
        try:
            subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, timeout=600)
        except (OSError, subprocess.SubprocessError):
            pass
        found = find_chromium()
    if found is None:
        pytest.skip("chromium is not installed and `apt-get install -y chromium` failed "
                    "(no root, or no package index): the browser check did not run")
    return found


@pytest.mark.slow
def test_report_renders_in_headless_chromium(caption_model, chromium, tmp_path):
    image = make_image(tmp_path / "post.jpg")
    run_explain([str(caption_model), "-o", str(tmp_path / "out"), "--text", "Kolo is here",
                 "--image", str(image), "--caption", "a dog playing on the grass", "--name", "post"])
    report = tmp_path / "out" / "post.html"
    screenshot = tmp_path / "shot.png"
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         f"--screenshot={screenshot}", "--window-size=1200,900", report.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # A CSP violation means the page tried to load something that is not embedded.
    for problem in ("Refused to", "Uncaught", "Failed to load resource"):
        assert problem not in done.stderr, done.stderr[-2000:]
    with Image.open(screenshot) as shot:
        pixels = numpy.asarray(shot.convert("RGB"), dtype="int16")
    not_white = (pixels < 240).any(axis=-1).mean()
    assert not_white > 0.01, "the screenshot is blank"
    # The embedded image rendered: its colour covers a patch of the page.
    magenta = (numpy.abs(pixels - numpy.asarray(IMAGE_COLOUR)) < 25).all(axis=-1).sum()
    assert magenta > 0.5 * 320 * 240
