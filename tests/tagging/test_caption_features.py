"""Captions in a Parquet features dataset (``tag --features`` with an image_captioner):
a job writes the captions it generates into the dataset, a job on another machine (a fresh
caption store) reads them from there instead of captioning again, on the local engine and
in the Ray caption stage; ``features export|import`` move captions between a caption store
and the dataset; a damaged caption file costs only a detour through the captioner."""
from dataclasses import asdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("pyarrow")

from batch_support import write_jsonl  # noqa: E402
from caption_support import build_captioning_pipeline, count_generate, image_only_posts  # noqa: E402
from spacy_agban.tagging.features import CaptionDataset, FeatureDataset, export_store  # noqa: E402
from spacy_agban.tagging.local import run_local  # noqa: E402
from spacy_agban.tagging.posts import read_output  # noqa: E402
from spacy_agban.units.caption_store import CaptionStore  # noqa: E402

NAMES = ["102.jpg", "106.jpg", "130.jpg", "149.jpg", "102.jpg", "missing.jpg", "106.jpg"]


@pytest.fixture(scope="module")
def captioning_model(tmp_path_factory):
    return build_captioning_pipeline(tmp_path_factory.mktemp("captioning_pipeline"))


@pytest.fixture
def generated(monkeypatch):
    """The number of images of each ImageCaptioner.generate call."""
    return count_generate(monkeypatch)


def use_cache(monkeypatch, folder: Path) -> Path:
    """Point the captioner's default store at ``folder`` (a machine of its own)."""
    monkeypatch.setenv("SPACY_AGBAN_CACHE", str(folder))
    return folder / "captions.sqlite"


def posts_file(tmp_path: Path) -> Path:
    rows = image_only_posts(NAMES) + [{"id": "given", "text": "Kolo is here", "image": "130.jpg",
                                       "caption": "a dog playing on the grass"}]
    return write_jsonl(tmp_path / "posts.jsonl", rows)


def tag(model: Path, source: Path, out: Path, features: Path) -> dict:
    return run_local(str(model), source, out, part_size=4, batch_size=3, progress=False, features=str(features))


def test_tag_writes_captions_to_the_dataset_and_another_store_reads_them_there(captioning_model, generated,
                                                                              tmp_path, monkeypatch) -> None:
    source = posts_file(tmp_path)
    features = tmp_path / "features"
    features.mkdir()
    store = use_cache(monkeypatch, tmp_path / "machine-a")
    first = tag(captioning_model, source, tmp_path / "a", features)
    assert sum(generated) == 4 and first["counts"]["caption:generated"] == 4
    dataset = CaptionDataset(str(features))
    (sig,) = dataset.signatures()
    assert dataset.signatures()[sig]["caption_version"] >= 1  # the description beside the rows
    assert all(Path(f).parent == features / "captions" / f"sig={sig}" for f in dataset.files(sig))
    assert dataset.get_many(dataset.keys(sig), sig) == CaptionStore(store).get_many(dataset.keys(sig), sig)
    assert len(dataset.keys(sig)) == 4 and FeatureDataset(str(features)).signatures() == {}
    files = dataset.files(sig)
    # another machine: an empty caption store, the same dataset; nothing is captioned again
    generated.clear()
    fresh = use_cache(monkeypatch, tmp_path / "machine-b")
    second = tag(captioning_model, source, tmp_path / "b", features)
    assert sum(generated) == 0 and second["counts"]["caption:cached"] == 6
    assert CaptionStore(fresh).count() == 0 and dataset.files(sig) == files  # read, nothing written
    assert read_output(tmp_path / "a") == read_output(tmp_path / "b")
    assert {u["source"] for u in {r["id"]: r for r in read_output(tmp_path / "b")}["p0"]["visual_units"]} == {"caption"}
    # the Ray engine's caption stage, run in this process on a third empty store: the same
    import pyarrow as pa

    from spacy_agban.tagging.core import PostColumns
    from spacy_agban.tagging.models import describe_pipeline
    from spacy_agban.tagging.posts import open_input, plan_parts, segments_to_json
    from spacy_agban.tagging.ray_engine import CaptionActor, read_part_batch

    use_cache(monkeypatch, tmp_path / "machine-c")
    reads = describe_pipeline(str(captioning_model))
    input_ = open_input(source, PostColumns())
    (part,) = plan_parts(input_, 100)
    read = read_part_batch(pa.table({"part": [0], "segments": [segments_to_json(part)]}),
                           {"files": list(input_.files), "fmt": input_.fmt, "columns": asdict(input_.columns)},
                           reads.loader_kwargs())
    staged = CaptionActor(reads, use_gpu=False, keep_bytes=False, features=str(features))(read).to_pydict()
    assert sum(generated) == 0
    assert staged["caption_status"] == ["cached"] * 5 + ["none", "cached", "given"]


def test_features_export_and_import_move_captions(captioning_model, generated, tmp_path, monkeypatch) -> None:
    from spacy_agban.cli import app

    store = use_cache(monkeypatch, tmp_path / "cache")
    run_local(str(captioning_model), posts_file(tmp_path), tmp_path / "out", progress=False)
    (sig,) = CaptionStore(store).signatures()
    captions = CaptionStore(store).get_many(CaptionStore(store).keys(sig), sig)
    assert len(captions) == 4
    runner = CliRunner()
    # a caption store is recognised as one: its captions go to ROOT/captions
    done = runner.invoke(app, ["features", "export", str(store), str(tmp_path / "ds")])
    assert done.exit_code == 0, done.output
    assert f'exported captions to {tmp_path / "ds"}: {{"{sig}": 4}}' in done.output
    dataset = CaptionDataset(str(tmp_path / "ds"))
    assert dataset.get_many(captions, sig) == captions and FeatureDataset(str(tmp_path / "ds")).signatures() == {}
    again = runner.invoke(app, ["features", "export", str(store), str(tmp_path / "ds")])
    assert f'{{"{sig}": 0}}' in again.output  # keys already there are skipped
    # a dataset of captions only fills a new caption store
    done = runner.invoke(app, ["features", "import", str(tmp_path / "ds"), str(tmp_path / "new.sqlite")])
    assert done.exit_code == 0, done.output
    assert f'imported captions into {tmp_path / "new.sqlite"}: {{"{sig}": 4}}' in done.output
    new = CaptionStore(tmp_path / "new.sqlite")
    assert new.get_many(captions, sig) == captions and new.signatures() == CaptionStore(store).signatures()
    # the other kind of store: one line
    done = runner.invoke(app, ["features", "export", str(store), str(tmp_path / "x"), "--detections"])
    assert done.exit_code == 1 and done.output.strip().splitlines() == [
        f"features export: {store} is a caption store; pass --captions to move its rows, or name the other store"]
    assert not (tmp_path / "x").exists()


def test_a_damaged_caption_file_costs_only_a_detour_through_the_captioner(captioning_model, generated, tmp_path,
                                                                        monkeypatch) -> None:
    import pyarrow.parquet as pq

    source = posts_file(tmp_path)
    store = use_cache(monkeypatch, tmp_path / "machine-a")
    run_local(str(captioning_model), source, tmp_path / "a", progress=False)
    (sig,) = CaptionStore(store).signatures()
    features = tmp_path / "features"
    assert export_store(str(store), str(features), rows_per_file=2, captions=True) == {sig: 4}
    good, bad = CaptionDataset(str(features)).files(sig)
    lost = set(pq.read_table(bad, columns=["image_key"])["image_key"].to_pylist())
    Path(bad).write_bytes(b"PAR1" + b"\0" * 64 + b"PAR1")
    generated.clear()
    use_cache(monkeypatch, tmp_path / "machine-b")
    result = tag(captioning_model, source, tmp_path / "b", features)
    assert sum(generated) == len(lost) == 2  # only the images of the damaged file are captioned again
    out = {r["id"]: r for r in read_output(tmp_path / "b")}
    seen = set()
    for key in ("p0", "p1", "p2", "p3", "p4", "p6"):  # batches p0-p2, p3, p4-p6: no image twice in one
        # the first post of a lost image detours; its new caption is added to the dataset, read from there later
        fell_back = out[key]["image_key"] in lost and out[key]["image_key"] not in seen
        seen.add(out[key]["image_key"])
        assert ("features" in out[key]["error_kinds"]) == fell_back, out[key]
        if fell_back:
            assert Path(bad).name in out[key]["error"] and "captioner's store and model instead" in out[key]["error"]
        assert {u["source"] for u in out[key]["visual_units"]} == {"caption"}, key
    assert "(captions: the captioner's store and model)" in result["summary"]
    assert set(CaptionDataset(str(features)).get_many(lost, sig)) == lost  # what was captioned again was added
    assert read_output(tmp_path / "a") == [{**r, "error": None, "error_kinds": []} if r["id"] != "p5" else r
                                           for r in read_output(tmp_path / "b")]
