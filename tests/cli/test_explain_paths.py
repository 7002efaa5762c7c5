"""`explain` resolves an image path once, for its check, the model and the report alike:
a post's object units are found whatever the current folder and the pipeline's
image_root."""
import hashlib

import numpy
import pytest
import spacy
from PIL import Image
from spacy.tokens import DocBin

from conftest import CAPTION_POSTS, TINY_MODEL, make_examples, make_nlp, train
from spacy_agban.detection.store import Detections, FeatureStore
from test_explain import run_explain

SIGNATURE = "test-detector"
DRAWN = "2 detected object(s) drawn"


@pytest.fixture(scope="module")
def model_with_image_root(tmp_path_factory):
    """A pipeline whose object units read a store and resolve images against its own
    image_root (a folder the tests never run in)."""
    folder = tmp_path_factory.mktemp("explain_paths")
    (folder / "pipeline_images").mkdir()
    image = folder / "pipeline_images" / "post.jpg"
    Image.new("RGB", (320, 240), (200, 30, 160)).save(image, format="JPEG", quality=95)
    detections = Detections(
        features=numpy.random.default_rng(0).normal(size=(2, 1024)).astype("float32"),
        labels=["person", "dog"], scores=numpy.asarray([0.9, 0.7], dtype="float32"),
        boxes=numpy.asarray([[20, 20, 150, 200], [170, 60, 300, 220]], dtype="float32"),
    )
    store = FeatureStore(folder / "store.sqlite")
    store.put(hashlib.sha256(image.read_bytes()).hexdigest(), SIGNATURE, detections)
    store.close()
    spacy.util.fix_random_seed(0)
    nlp = make_nlp()
    nlp.remove_pipe("agban")
    nlp.add_pipe("agban", config={
        "model": {**TINY_MODEL, "fusion": "gban", "adversarial": True},
        "caption_units": {"@misc": "spacy_agban.CaptionUnits.v1", "top_k": 3},
        "object_units": {"@misc": "spacy_agban.ObjectUnits.v1", "store": str(folder / "store.sqlite"),
                         "signature": SIGNATURE, "top_k": 3, "image_root": str(folder / "pipeline_images")},
    })
    examples = make_examples(nlp, CAPTION_POSTS)
    for eg in examples[:2]:
        eg.predicted._.image = "post.jpg"
        eg.reference._.image = "post.jpg"
    train(nlp, examples, steps=2)
    nlp.to_disk(folder / "model")
    return folder / "model", image


def test_explain_image_relative_to_the_current_folder(model_with_image_root, tmp_path, monkeypatch) -> None:
    model, image = model_with_image_root
    here = tmp_path / "here"
    here.mkdir()
    (here / "mine.jpg").write_bytes(image.read_bytes())  # not in the pipeline's image_root
    monkeypatch.chdir(here)
    run_explain([str(model), "-o", str(tmp_path / "out"), "--text", "Kolo is here", "--image", "mine.jpg",
                 "--name", "post"])
    assert DRAWN in (tmp_path / "out" / "post.html").read_text(encoding="utf-8")
    # with --image-root, the path is relative to it, for the check and the model
    run_explain([str(model), "-o", str(tmp_path / "out"), "--text", "Kolo is here", "--image", "mine.jpg",
                 "--image-root", str(here), "--name", "rooted"])
    assert DRAWN in (tmp_path / "out" / "rooted.html").read_text(encoding="utf-8")


def test_explain_docs_draw_the_images_the_model_read(model_with_image_root, tmp_path, monkeypatch) -> None:
    """Relative paths in a DocBin resolve against the pipeline's image_root for the report
    too, not only for the model."""
    model, _ = model_with_image_root
    nlp = spacy.blank("en")
    doc = nlp.make_doc("Kolo is here")
    doc._.image = "post.jpg"
    DocBin(docs=[doc], store_user_data=True).to_disk(tmp_path / "posts.spacy")
    monkeypatch.chdir(tmp_path)
    run_explain([str(model), "-o", str(tmp_path / "out"), "--docs", str(tmp_path / "posts.spacy")])
    (report,) = (tmp_path / "out").glob("*.html")
    text = report.read_text(encoding="utf-8")
    assert DRAWN in text and "file not found" not in text
