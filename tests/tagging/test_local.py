"""``python -m spacy_agban tag`` on one machine: parsing, error rows, resuming, features moving."""
import json
from collections import Counter
from pathlib import Path

import pytest

from batch_support import build_objects_pipeline, posts, write_jsonl
from spacy_agban.tagging import core
from spacy_agban.tagging.local import run_local
from spacy_agban.tagging.posts import InputError, read_output


@pytest.fixture(scope="module")
def objects_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("objects_pipeline")
    model = build_objects_pipeline(root)
    (root / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    (root / "outside.jpg").write_bytes(b"whatever")
    return root, model


def ids(rows):
    return [r["id"] for r in rows]


def test_malformed_records_become_error_rows() -> None:
    lines = ['{"id": 1, "text": "ok", "image": null}', "{broken", "[1, 2]", '{"text": "no id"}',
             '{"id": "a", "text": 7}', '{"id": {"x": 1}, "text": "t", "caption": 3, "image": 4}']
    wheres = [f"f.jsonl:{i}" for i in range(1, 7)]
    batch = core.parse_lines(lines, wheres, core.PostColumns())
    assert batch["id"] == ["1", "f.jsonl:2", "f.jsonl:3", "f.jsonl:4", "a", "f.jsonl:6"]
    kinds = [[core.error_kind(e) for e in errors] for errors in batch["errors"]]
    assert kinds == [[], ["bad_input"], ["bad_input"], ["bad_input"], ["bad_input"],
                     ["bad_input", "image_refused", "bad_caption"]]
    assert "invalid JSON" in batch["errors"][1][0] and "{broken" in batch["errors"][1][0]
    assert batch["text"] == ["ok", None, None, "no id", None, "t"]
    renamed = core.parse_records([{"pid": 5, "body": "hi", "img": "a.jpg", "alt": "x"}], ["w"],
                                 core.PostColumns("pid", "body", "img", "alt"))
    assert (renamed["id"], renamed["text"], renamed["image"], renamed["caption"]) == (["5"], ["hi"], ["a.jpg"], ["x"])


def test_bad_images_and_captions_are_error_rows_and_the_rest_is_tagged(objects_model, tmp_path, monkeypatch) -> None:
    root, model = objects_model
    rows = posts(10)
    rows[1]["image"] = "missing.jpg"
    rows[2]["image"] = "broken.jpg"
    rows[3]["image"] = "../outside.jpg"
    rows[4]["caption"] = 12345
    rows[6]["caption"] = "boom: the caption units raise on this one"
    lines = rows + ["{not json"]
    # a caption the pipeline itself fails on: that post is retried without it
    from spacy_agban.units.base import CaptionUnits

    original = CaptionUnits.for_doc

    def fragile(self, doc):
        if (doc._.image_caption or "").startswith("boom"):
            raise RuntimeError("caption exploded")
        return original(self, doc)

    monkeypatch.setattr(CaptionUnits, "for_doc", fragile)
    result = run_local(str(model), write_jsonl(tmp_path / "posts.jsonl", lines), tmp_path / "out",
                       part_size=4, batch_size=3, progress=False)
    out = {r["id"]: r for r in read_output(tmp_path / "out")}
    assert len(out) == 11 and result["posts"] == 11
    assert out["p1"]["error_kinds"] == ["image_missing"] and "missing.jpg" in out["p1"]["error"]
    assert out["p2"]["error_kinds"] == ["image_corrupt"]
    assert out["p3"]["error_kinds"] == ["image_refused"]
    assert out["p4"]["error_kinds"] == ["bad_caption"] and "int" in out["p4"]["error"]
    assert out["p6"]["error_kinds"] == ["bad_caption"] and "caption exploded" in out["p6"]["error"]
    assert out["posts.jsonl:11"]["error_kinds"] == ["bad_input"] and out["posts.jsonl:11"]["entities"] == []
    for key, row in out.items():
        if not key.startswith("posts.jsonl"):
            assert row["entities"], f"{key} was not tagged"
        if key in ("p0", "p5", "p7", "p8", "p9"):
            assert row["error"] is None
    assert [u["source"] for u in out["p0"]["visual_units"]][:3] == ["object"] * 3
    # an image that could not be used is "failed", never "none" (the status of a post without one)
    assert {out[k]["image_status"] for k in ("p1", "p2", "p3")} == {"failed"}
    assert out["p7"]["image_status"] == "none" and out["p0"]["image_status"] in ("cached", "detected")
    assert not any(u["source"] == "caption" for u in out["p6"]["visual_units"])
    counts = result["counts"]
    assert counts["error:bad_caption"] == 2 and counts["error:bad_input"] == 1
    assert "errors by kind" in result["summary"] and "posts/s" in result["summary"]


def test_an_interrupted_run_resumes_without_duplicates(objects_model, tmp_path) -> None:
    _, model = objects_model
    source = write_jsonl(tmp_path / "posts.jsonl", posts(11))
    reference = run_local(str(model), source, tmp_path / "whole", part_size=3, batch_size=2, progress=False)

    class Interrupted(Exception):
        pass

    def stop_after_part_1(index: int) -> None:
        if index == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_local(str(model), source, tmp_path / "out", part_size=3, batch_size=2, progress=False,
                  after_part=stop_after_part_1)
    assert ids(read_output(tmp_path / "out")) == [f"p{i}" for i in range(6)]
    (tmp_path / "out" / "part-000002.parquet.tmp").write_bytes(b"half a part")  # a write cut off
    resumed = run_local(str(model), source, tmp_path / "out", part_size=3, batch_size=2, progress=False)
    assert resumed["parts_skipped"] == 2 and resumed["posts"] == 5 and resumed["posts_in_output"] == 11
    assert "11 posts in all" in resumed["summary"] and "5 tagged by this run, 6 in the 2 parts" in resumed["summary"]
    rows = read_output(tmp_path / "out")
    assert ids(rows) == [f"p{i}" for i in range(11)] and max(Counter(ids(rows)).values()) == 1
    assert rows == read_output(tmp_path / "whole")
    assert reference["posts"] == 11
    with pytest.raises(InputError, match="another job"):
        run_local(str(model), source, tmp_path / "out", part_size=4, progress=False)
    with pytest.raises(InputError, match="--resume"):
        run_local(str(model), source, tmp_path / "out", part_size=3, progress=False, resume=False)


def test_parquet_input_renamed_columns_and_jsonl_output(objects_model, tmp_path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    _, model = objects_model
    rows = [{"post_id": r["id"], "body": r["text"], "alt": r["caption"]} for r in posts(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "posts.parquet")
    columns = core.PostColumns(id="post_id", text="body", image="picture", caption="alt")
    run_local(str(model), tmp_path / "posts.parquet", tmp_path / "out", columns, output_format="jsonl",
              progress=False)
    out = [json.loads(line) for line in (tmp_path / "out" / "part-000000.jsonl").read_text().splitlines()]
    assert ids(out) == [f"p{i}" for i in range(5)] and all(r["error"] is None for r in out)
    assert out[0]["entities"][0].keys() == {"start_char", "end_char", "label", "text", "confidence"}
    assert all(0.0 < e["confidence"] <= 1.0 for r in out for e in r["entities"])  # the CRF's, per entity
    with pytest.raises(InputError, match="no column 'id'"):
        run_local(str(model), tmp_path / "posts.parquet", tmp_path / "other", progress=False)


def test_features_move_between_the_sqlite_store_and_the_parquet_dataset(objects_model, tmp_path) -> None:
    pytest.importorskip("pyarrow")
    from spacy_agban.tagging.features import FeatureDataset, export_store, import_dataset
    from spacy_agban.detection.store import FeatureStore

    root, _ = objects_model
    store = FeatureStore(root / "objects.sqlite")
    (sig,) = store.signatures()
    keys = list(store.keys(sig))
    assert len(keys) == 4
    assert export_store(str(root / "objects.sqlite"), str(tmp_path / "features")) == {sig: 4}
    assert export_store(str(root / "objects.sqlite"), str(tmp_path / "features")) == {sig: 0}  # nothing new
    dataset = FeatureDataset(str(tmp_path / "features"))
    assert dataset.signatures()[sig] == store.signatures()[sig] and dataset.keys(sig) == set(keys)
    assert import_dataset(str(tmp_path / "features"), str(tmp_path / "copy.sqlite")) == {sig: 4}
    copy = FeatureStore(tmp_path / "copy.sqlite")
    assert copy.signatures() == store.signatures()
    ours, theirs = store.get_many(keys, sig), copy.get_many(keys, sig)
    for key in keys:
        assert ours[key].labels == theirs[key].labels
        assert (ours[key].features == theirs[key].features).all() and (ours[key].boxes == theirs[key].boxes).all()


def test_tag_command_line(objects_model, tmp_path) -> None:
    from typer.testing import CliRunner

    from spacy_agban.cli import app

    _, model = objects_model
    source = write_jsonl(tmp_path / "posts.jsonl", posts(3))
    result = CliRunner().invoke(app, ["tag", str(model), str(source), str(tmp_path / "out"), "--part-size", "2"])
    assert result.exit_code == 0, result.output
    assert "tag (local): 3 posts" in result.output
    assert ids(read_output(tmp_path / "out")) == ["p0", "p1", "p2"]
    bad = CliRunner().invoke(app, ["tag", str(model), str(tmp_path / "nothing.jsonl"), str(tmp_path / "o2")])
    assert bad.exit_code == 1 and "does not exist" in bad.output


def test_stages_that_cannot_be_scheduled_fail_with_a_message() -> None:
    from spacy_agban.tagging.ray_engine import RayOptions, as_uri, check_resources, needed_cpus

    class Cluster:
        def __init__(self, **resources):
            self.resources = resources

        def cluster_resources(self):
            return self.resources

    options = RayOptions(detect_actors=2, tag_actors=2)
    assert needed_cpus(options) == 5
    check_resources(Cluster(CPU=5, GPU=1), options, 0.5, detect=True)
    with pytest.raises(InputError, match="ask for 5 CPUs"):
        check_resources(Cluster(CPU=4, GPU=1), options, 0.5, detect=True)
    with pytest.raises(InputError, match="2 GPUs"):
        check_resources(Cluster(CPU=8), options, 1.0, detect=True)
    check_resources(Cluster(CPU=3), options, 1.0, detect=False)  # no detection: no GPU asked
    assert as_uri(Path("s3://bucket/features")) == "s3://bucket/features"
    assert as_uri(Path("relative/features")) == "relative/features"


def test_parts_are_planned_across_files_and_named_by_file_and_line(tmp_path) -> None:
    from spacy_agban.tagging.posts import open_input, plan_parts, read_part

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(b'{"id": 1, "text": "one"}\n\n{"id": 2, "text": "t\\r two"}\r\n{broken\n')
    (folder / "b.jsonl").write_bytes(b'\n{"id": 4, "text": "four"}\n{"id": 5, "text": "five"}')
    source = open_input(folder, core.PostColumns())
    plan = plan_parts(source, 2)
    assert [sum(s.count for s in part) for part in plan] == [2, 2, 1]
    batches = [read_part(source, part) for part in plan]
    assert [b["id"] for b in batches] == [["1", "2"], ["a.jsonl:4", "4"], ["5"]]
    assert batches[0]["text"][1] == "t\r two"  # a carriage return inside a line ends nothing
    assert "a.jsonl:4" in batches[1]["errors"][0][0]


def test_a_lone_surrogate_is_an_error_row_not_a_failed_job(objects_model, tmp_path) -> None:
    _, model = objects_model
    source = write_jsonl(tmp_path / "p.jsonl", ['{"id": "s", "text": "Obama \\ud800 in Chicago", "caption": "x \\udc00"}',
                                                 '{"id": "ok", "text": "Kolo is here"}'])
    result = run_local(str(model), source, tmp_path / "out", progress=False)
    rows = {r["id"]: r for r in read_output(tmp_path / "out")}
    assert result["posts"] == 2 and sorted(rows) == ["ok", "s"]
    assert rows["s"]["error_kinds"] == ["bad_caption", "bad_input"] and "surrogate" in rows["s"]["error"]
    assert rows["ok"]["error"] is None


def test_detection_never_imports_the_batch_package() -> None:
    import ast

    import spacy_agban.detection as detection

    for path in Path(detection.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            assert not any("batch" in n for n in names), f"{path.name} imports {names}"


def test_jsonl_lines_end_at_newlines_only(tmp_path) -> None:
    from spacy_agban.tagging.posts import count_posts, open_input, plan_parts, read_part

    source = tmp_path / "posts.jsonl"
    source.write_bytes(b'{"id": 1,\r "text": "Obama"}\r\n{"id": 2, "text": "Boston\\r"}\n\n{"id": 3,\r\r "text": "x"}')
    posts_in = open_input(source, core.PostColumns())
    (part,) = plan_parts(posts_in, 10)
    batch = read_part(posts_in, part)
    assert batch["id"] == ["1", "2", "3"] and batch["errors"] == [[], [], []]
    assert batch["text"] == ["Obama", "Boston\r", "x"]
    assert count_posts([source], "jsonl") == 3
    first, rest = plan_parts(posts_in, 1)[:1], plan_parts(posts_in, 1)[1:]
    assert [read_part(posts_in, p)["id"] for p in first + rest] == [["1"], ["2"], ["3"]]


def test_a_caption_only_pipeline_says_it_does_not_read_images(tmp_path) -> None:
    from conftest import CAPTION_POSTS, make_examples, make_nlp, train

    # Its own pipeline: the session's caption_pipeline is trained from the RNG state of
    # whichever test asks first, and other tests expect the one trained later.
    nlp = make_nlp()
    train(nlp, make_examples(nlp, CAPTION_POSTS), steps=3)
    model = tmp_path / "model"
    nlp.to_disk(model)
    rows = posts(4, images=["102.jpg", None])
    result = run_local(str(model), write_jsonl(tmp_path / "posts.jsonl", rows), tmp_path / "out", progress=False)
    assert result["summary"].count("does not read images") == 1
    assert "the image of 2 posts was not used" in result["summary"]
    text_only = run_local(str(model), write_jsonl(tmp_path / "text.jsonl", posts(2, images=[None])),
                          tmp_path / "out2", progress=False)
    assert "images" not in text_only["summary"]


def test_unresolvable_paths_and_a_damaged_store_entry_cost_only_their_post(objects_model, tmp_path) -> None:
    import sqlite3

    root, model = objects_model
    images = root / "images"
    if not (images / "loop_a").is_symlink():
        (images / "loop_a").symlink_to(images / "loop_b")
        (images / "loop_b").symlink_to(images / "loop_a")
    with sqlite3.connect(root / "objects.sqlite") as conn:
        (damaged,) = conn.execute("SELECT image_key FROM detections ORDER BY image_key LIMIT 1").fetchone()
        conn.execute("UPDATE detections SET labels = '[1, 2, 3]' WHERE image_key = ?", (damaged,))
        conn.execute("UPDATE detections SET n = 5 WHERE image_key != ?", (damaged,))
    rows = posts(6)  # 102, 106, none, 113, 130, 102.jpg
    rows[2]["image"] = "102.jpg\x00x"
    rows[5]["image"] = "loop_a"
    with pytest.warns(UserWarning, match="is damaged"):
        result = run_local(str(model), write_jsonl(tmp_path / "posts.jsonl", rows), tmp_path / "out",
                           part_size=4, batch_size=3, progress=False)
    out = {r["id"]: r for r in read_output(tmp_path / "out")}
    assert sorted(out) == [f"p{i}" for i in range(6)] and result["posts"] == 6
    assert out["p2"]["error_kinds"] == ["image_refused"] and "NUL" in out["p2"]["error"]
    assert out["p5"]["error_kinds"] == ["image_refused"] and "loop_a" in out["p5"]["error"]
    for key in ("p0", "p1", "p3", "p4"):  # their entries were damaged: detected again
        assert out[key]["image_status"] == "detected" and out[key]["error"] is None
        assert [u["source"] for u in out[key]["visual_units"]][:3] == ["object"] * 3
    from spacy_agban.detection.store import FeatureStore

    store = FeatureStore(root / "objects.sqlite")
    (sig,) = store.signatures()
    assert len(store.get_many(list(store.keys(sig)), sig)) == 4  # the new entries replaced the damaged ones


def test_a_batch_whose_detection_failed_keeps_image_failures_failed() -> None:
    from spacy_agban.tagging.ray_engine import failed_detection

    batch = {"id": ["a", "b", "c"], "text": ["x", "y", "z"], "image": ["1.jpg", "gone.jpg", None],
             "caption": [None] * 3, "image_key": ["k1", None, None], "image_bytes": [b"1", None, None],
             "errors": [[], [core.error(core.IMAGE_PREFIX + "missing", "gone.jpg: no such file")], []]}
    out = failed_detection(batch, RuntimeError("store unreadable"))
    # the image that could not be read is failed (as core.detect says), not "none"
    assert out["image_status"] == ["failed", "failed", "none"]
    assert [len(e) for e in out["errors"]] == [1, 1, 0] and "store unreadable" in out["errors"][0][0]
    assert "image_bytes" not in out
