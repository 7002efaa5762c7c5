"""A saved pipeline with object units is self-contained: its feature store is found from
any folder (as its image_root is), and a path that is not a feature store is never
written to."""
import shutil
import sqlite3
import warnings
from pathlib import Path

import pytest
import spacy
from PIL import Image
from spacy.training import Example

from conftest import TINY_MODEL
from spacy_agban.detection.store import FeatureStore, NotAFeatureStore
from spacy_agban.units.base import OBJECT
from spacy_agban.units.objects import ObjectUnits
from test_objects import FakeDetector


def saved_object_pipeline(work: Path, store: str = "stores/objects.sqlite") -> Path:
    """Trained (initialized) in ``work`` with a relative store and image_root, as
    `spacy train` runs in a project folder; saved to work/model."""
    (work / "images").mkdir(parents=True)
    Image.new("RGB", (64, 48), (255, 0, 0)).save(work / "images" / "red.png")
    filler = ObjectUnits(store=store, detector=FakeDetector(), image_root="images")
    filler.detections_for(["red.png"])
    units = {"@misc": "spacy_agban.ObjectUnits.v1", "store": store, "image_root": "images",
             "signature": filler.signature}
    nlp = spacy.blank("en")
    nlp.add_pipe("agban", config={"model": {**TINY_MODEL, "fusion": "gban", "adversarial": True},
                                  "caption_units": None, "object_units": units})
    doc = nlp.make_doc("Kolo is here")
    doc._.image = "red.png"
    nlp.initialize(lambda: [Example.from_dict(doc, {"entities": [(0, 4, "PER")]})])
    nlp.to_disk(work / "model")
    return work / "model"


def object_sources(nlp) -> list:
    post = nlp.make_doc("Kolo is here")
    post._.image = "red.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not in the feature store", no "Skipping image"
        return [u["source"] for u in nlp(post)._.visual_units]


def test_a_saved_relative_store_is_found_from_any_folder(tmp_path: Path, monkeypatch) -> None:
    work, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    model = saved_object_pipeline(work)
    monkeypatch.chdir(elsewhere)  # no stores/ here: the store is the one it was saved with
    loaded = spacy.load(model)
    assert loaded.get_pipe("agban").object_units.store_path == work / "stores" / "objects.sqlite"
    assert object_sources(loaded) == [OBJECT] * 3
    assert not (elsewhere / "stores").exists()
    # the batch engines read the block without loading the pipeline: the same store
    from spacy_agban.tagging.models import object_units_block

    assert object_units_block(str(model))[1]["store"] == str(work / "stores" / "objects.sqlite")
    # An override is the caller's choice, against the current folder: missing, said at load.
    with pytest.raises(FileNotFoundError, match=f"looked for {elsewhere}/other.sqlite"):
        spacy.load(model, config={"components.agban.object_units.store": "other.sqlite"})


def test_a_store_shipped_in_the_pipeline_folder_is_its_own(tmp_path: Path, monkeypatch) -> None:
    """Copied with the pipeline (e.g. before `spacy package`) at its configured path, the
    store travels with the folder: found after the folder moves and the original is gone."""
    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)
    model = saved_object_pipeline(work)
    shutil.copytree(work / "stores", model / "stores")
    moved = shutil.move(str(model), str(tmp_path / "installed" / "model"))
    shutil.rmtree(work / "stores")  # the images stay: the store is keyed by their content
    monkeypatch.chdir(tmp_path)
    loaded = spacy.load(moved)
    assert loaded.get_pipe("agban").object_units.store_path == Path(moved) / "stores" / "objects.sqlite"
    assert object_sources(loaded) == [OBJECT] * 3


def test_a_saved_store_that_is_gone_is_named_at_load(tmp_path: Path, monkeypatch) -> None:
    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)
    model = saved_object_pipeline(work)
    (work / "stores" / "objects.sqlite").unlink()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"nor at {work}/stores/objects.sqlite, where the pipeline was saved with it"):
        spacy.load(model)
    assert not (tmp_path / "stores").exists()


@pytest.mark.parametrize("content", [b"", b"not a database at all\n", "sqlite-other-tables"])
def test_a_store_path_that_is_not_a_feature_store_is_never_written(tmp_path: Path, content) -> None:
    path = tmp_path / "objects.sqlite"
    if content == "sqlite-other-tables":
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE mine (x)")
    else:
        path.write_bytes(content)
    before = path.read_bytes()
    for create in (False, True):  # a reader, and a writer (detect)
        with pytest.raises(NotAFeatureStore, match="is not a feature store .* left untouched"):
            FeatureStore(path, create=create)
    # as a pipeline's configured store: one clear error at load/first use
    for detector in (None, FakeDetector()):
        units = ObjectUnits(store=path, detector=detector)
        with pytest.raises(NotAFeatureStore, match="not a feature store"):
            units.check_store()
        with pytest.raises(NotAFeatureStore):
            units.store
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["objects.sqlite"]


def test_a_pipeline_whose_store_is_an_empty_file_fails_at_load_untouched(tmp_path: Path, monkeypatch) -> None:
    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)
    model = saved_object_pipeline(work)
    store = work / "stores" / "objects.sqlite"
    store.unlink()
    store.write_bytes(b"")
    with pytest.raises(NotAFeatureStore, match="an empty file"):
        spacy.load(model)
    assert store.read_bytes() == b""


def test_detect_refuses_a_store_that_is_not_a_feature_store(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from spacy_agban.cli import app

    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 48), (255, 0, 0)).save(tmp_path / "images" / "red.png")
    store = tmp_path / "notes.txt"
    store.write_text("my notes\n")
    result = CliRunner().invoke(app, ["detect", str(tmp_path / "images"), str(store), "--detector", "mobilenet",
                                      "--weights", "random"])
    assert result.exit_code == 1 and type(result.exception) is SystemExit, result.output
    (line,) = result.output.strip().splitlines()
    assert "notes.txt is not a feature store" in line and "left untouched" in line
    assert store.read_text() == "my notes\n"
