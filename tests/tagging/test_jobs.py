"""What a ``tag`` job may touch, what it records, and what it checks before it starts.

A refusal touches nothing; a job removes only files it wrote; a resume with another model,
input or settings is refused by content, naming what changed; an empty or damaged part is
redone; ``--features`` is checked up front and a damaged features file costs only a fallback;
repeated ids are counted. The Ray engine makes every check before it starts a cluster, so its
refusals are tested here without one.
"""
import json
import shutil
import sqlite3
from pathlib import Path
from typing import Dict, Tuple

import pytest
import spacy

from batch_support import build_objects_pipeline, posts, write_jsonl
from conftest import CAPTION_POSTS, make_examples, make_nlp, train
from spacy_agban.tagging import core, models
from spacy_agban.tagging.job import DuplicateIdsWarning
from spacy_agban.tagging.local import run_local
from spacy_agban.tagging.posts import InputError, read_output
from spacy_agban.tagging.ray_engine import run_ray


def caption_model(path: Path, steps: int) -> Path:
    spacy.util.fix_random_seed(0)
    nlp = make_nlp()
    train(nlp, make_examples(nlp, CAPTION_POSTS), steps=steps)
    nlp.to_disk(path)
    return path


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> Tuple[Path, Path]:
    """Two caption-only pipelines that differ in their weights only."""
    root = tmp_path_factory.mktemp("two_models")
    return caption_model(root / "a", steps=3), caption_model(root / "b", steps=5)


@pytest.fixture(scope="module")
def objects_models(tmp_path_factory) -> Dict[str, Path]:
    """An objects pipeline with a detector and its store of 4 images, and the same
    pipeline without a detector, reading a copy of that store."""
    root = tmp_path_factory.mktemp("objects_models")
    model = build_objects_pipeline(root)
    store = root / "nodet.sqlite"
    with sqlite3.connect(root / "objects.sqlite") as a, sqlite3.connect(store) as b:
        a.backup(b)
    nlp = spacy.load(model, config={"components.agban.object_units.detector": None,
                                    "components.agban.object_units.store": str(store)})
    nlp.to_disk(root / "nodet")
    return {"root": root, "model": model, "nodet": root / "nodet", "store": store}


def local(model: Path, source: Path, out: Path, **kwargs):
    return run_local(str(model), source, out, progress=False, **kwargs)


def ray(model: Path, source: Path, out: Path, **kwargs):
    """The Ray engine, where every check comes before a cluster: a refusal must not start one."""
    result = run_ray(str(model), str(source), str(out), **kwargs)
    raise AssertionError(f"the Ray engine ran: {result['summary']}")


ENGINES = {"local": local, "ray": ray}


def snapshot(folder: Path) -> Dict[str, Tuple[bytes, int]]:
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _no_cluster_started() -> None:
    try:
        import ray as ray_module
    except ImportError:
        return
    assert not ray_module.is_initialized()


# -- a refusal touches nothing; a job removes only what it wrote ---------------------------------


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_a_refused_output_folder_is_left_exactly_as_it_was(two_models, tmp_path, engine) -> None:
    model, _ = two_models
    source = write_jsonl(tmp_path / "posts.jsonl", posts(3))
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "notes.tmp").write_text("the user's notes")
    (out / "part-000000.parquet.tmp").write_text("a name like ours, in a folder that is not a job's")
    (out / "sub" / "draft.tmp").write_text("draft")
    (out / "data.csv").write_text("a,b\n")
    before = snapshot(out)
    with pytest.raises(InputError, match="not empty and holds no _job.json"):
        ENGINES[engine](model, source, out, part_size=2)
    assert snapshot(out) == before
    _no_cluster_started()


def test_a_job_removes_only_its_own_leftovers(two_models, tmp_path) -> None:
    model, other = two_models
    source = write_jsonl(tmp_path / "posts.jsonl", posts(5))
    out = tmp_path / "out"
    local(model, source, out, part_size=2)
    (out / "mine.tmp").write_text("a file of the user's in the job's folder")
    (out / "part-000001.parquet.tmp").write_text("a leftover of this job: part 1 is complete")
    before = snapshot(out)
    with pytest.raises(InputError, match="another job"):  # another model: refused, nothing touched
        local(other, source, out, part_size=2)
    assert snapshot(out) == before
    result = local(model, source, out, part_size=2)  # the same job: resumed
    assert result["parts_skipped"] == 3 and result["posts"] == 0
    assert (out / "mine.tmp").read_text() == "a file of the user's in the job's folder"
    assert not (out / "part-000001.parquet.tmp").exists()


# -- a resume is refused when what the job depends on changed, by content ------------------------


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_a_resume_with_a_replaced_model_or_an_edited_input_is_refused(two_models, tmp_path, engine) -> None:
    model_a, model_b = two_models
    model = shutil.copytree(model_a, tmp_path / "model")
    source = write_jsonl(tmp_path / "posts.jsonl", posts(5))
    out = tmp_path / "out"
    whole = local(model, source, out, part_size=2)
    reference = read_output(out)
    (out / "part-000001.parquet").unlink()
    kept = snapshot(out)
    # the model replaced at the same path: refused, naming the model and its changed file
    shutil.rmtree(model)
    shutil.copytree(model_b, model)
    with pytest.raises(InputError, match=r"the model changed since the job started \(agban/model"):
        ENGINES[engine](model, source, out, part_size=2)
    assert snapshot(out) == kept
    # the same bytes again (new files, new times: hashed again, and found the same)
    shutil.rmtree(model)
    shutil.copytree(model_a, model, copy_function=shutil.copy)
    # the input edited: refused, naming the input file
    original = source.read_text()
    source.write_text(original.replace("Kolo", "Kola", 1))
    with pytest.raises(InputError, match=r"the input changed since the job started \(posts.jsonl\)"):
        ENGINES[engine](model, source, out, part_size=2)
    assert snapshot(out) == kept
    _no_cluster_started()
    source.write_text(original)
    resumed = local(model, source, out, part_size=2)
    assert resumed["parts_written"] == 1 and resumed["posts_in_output"] == whole["posts"] == 5
    assert read_output(out) == reference


def test_a_resume_with_other_settings_names_them(two_models, tmp_path) -> None:
    model, _ = two_models
    source = write_jsonl(tmp_path / "posts.jsonl", posts(4))
    out = tmp_path / "out"
    local(model, source, out, part_size=2)
    with pytest.raises(InputError, match=r"another job: settings part_size 2 -> 3"):
        local(model, source, out, part_size=3)
    record = json.loads((out / "_job.json").read_text())
    assert record["input"]["posts"] == 4 and record["input"]["files"]["posts.jsonl"]["size"] == source.stat().st_size
    assert "agban/model" in record["model"]["files"] and "config.cfg" in record["model"]["files"]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_an_empty_or_damaged_part_is_redone_not_counted(two_models, tmp_path, fmt) -> None:
    model, _ = two_models
    source = write_jsonl(tmp_path / "posts.jsonl", posts(5))
    out = tmp_path / "out"
    local(model, source, out, part_size=2, output_format=fmt)
    reference = read_output(out)
    (out / f"part-000000.{fmt}").write_bytes(b"")  # 0 bytes
    damaged = (out / f"part-000001.{fmt}").read_bytes()
    (out / f"part-000001.{fmt}").write_bytes(damaged[: len(damaged) // 2])  # cut off
    result = local(model, source, out, part_size=2, output_format=fmt)
    assert read_output(out) == reference
    assert result["posts"] == 4 and result["posts_in_output"] == 5 and result["parts_skipped"] == 1
    assert result["parts_redone"] == [0, 1]
    assert "redone: 2 damaged part(s)" in result["summary"] and "empty (0 bytes)" in result["summary"]


# -- --features, checked up front; a damaged file falls back row by row ---------------------------


def _features_with(root: Path, sig: str, table) -> Path:
    import pyarrow.parquet as pq

    (root / f"sig={sig}").mkdir(parents=True)
    pq.write_table(table, root / f"sig={sig}" / "part-0.parquet")
    return root


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_features_are_checked_before_anything_runs(objects_models, two_models, tmp_path, engine) -> None:
    pa = pytest.importorskip("pyarrow")
    from spacy_agban.detection.store import FeatureStore
    from spacy_agban.tagging.features import export_store

    (sig,) = FeatureStore(objects_models["store"]).signatures()
    source = write_jsonl(tmp_path / "posts.jsonl", posts(3))
    run = ENGINES[engine]
    empty = tmp_path / "empty"
    empty.mkdir()
    wrong_schema = _features_with(tmp_path / "wrong_schema", sig, pa.table({"image_key": ["k"], "x": [1]}))
    other_sig = _features_with(tmp_path / "other_sig", "0123abcd", pa.table({"image_key": ["k"]}))
    unreadable = tmp_path / "unreadable"
    export_store(str(objects_models["store"]), str(unreadable))
    (unreadable / "signatures" / f"{sig}.json").write_text("{not json")
    all_corrupt = tmp_path / "all_corrupt"
    export_store(str(objects_models["store"]), str(all_corrupt))
    for part in (all_corrupt / f"sig={sig}").glob("*.parquet"):
        part.write_bytes(b"PAR1 not parquet PAR1")
    cases = [
        (objects_models["nodet"], tmp_path / "missing", "does not exist"),
        (objects_models["model"], tmp_path / "missing", "create the folder to start a dataset"),
        (objects_models["nodet"], empty, "holds no features"),
        (objects_models["nodet"], wrong_schema, "is not a features dataset file: column 'features'"),
        (objects_models["nodet"], other_sig, "holds no features of the detector the pipeline was trained with"),
        (objects_models["nodet"], unreadable, "cannot read the features dataset"),
        (objects_models["nodet"], all_corrupt, "no file of the features dataset .* can be read"),
        (two_models[0], tmp_path / "missing", "reads no images"),
    ]
    for i, (model, features, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        with pytest.raises(InputError, match=message) as caught:
            run(model, source, out, features=str(features))
        assert "\n" not in str(caught.value) and str(caught.value).startswith("--features")
        assert not out.exists(), message
    _no_cluster_started()
    # a pipeline with a detector fills an empty dataset: that one is fine
    if engine == "local":
        result = local(objects_models["model"], source, tmp_path / "filled", features=str(empty))
        assert result["posts"] == 3


def test_features_errors_on_the_command_line_are_one_line(objects_models, tmp_path) -> None:
    from typer.testing import CliRunner

    from spacy_agban.cli import app

    source = write_jsonl(tmp_path / "posts.jsonl", posts(2))
    result = CliRunner().invoke(app, ["tag", str(objects_models["nodet"]), str(source), str(tmp_path / "out"),
                                      "--features", str(tmp_path / "nowhere")])
    assert type(result.exception) is SystemExit and result.exit_code == 1, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("tag: --features: the features dataset") and "does not exist" in line


def test_a_damaged_features_file_falls_back_to_the_pipelines_store_and_says_so(objects_models, tmp_path) -> None:
    import pyarrow.parquet as pq

    from spacy_agban.detection.store import FeatureStore
    from spacy_agban.tagging.features import FeatureDataset, export_store

    store = FeatureStore(objects_models["store"])
    (sig,) = store.signatures()
    features = tmp_path / "features"
    export_store(str(objects_models["store"]), str(features), rows_per_file=2)  # two files of 2 images
    dataset = FeatureDataset(str(features))
    good, bad = dataset.files(sig)
    lost = set(pq.read_table(bad, columns=["image_key"])["image_key"].to_pylist())  # its images, before the damage
    Path(bad).write_bytes(b"PAR1" + b"\0" * 64 + b"PAR1")  # damaged after the up-front check would pass
    rows = posts(5)  # 102, 106, none, 113, 130
    result = local(objects_models["nodet"], write_jsonl(tmp_path / "posts.jsonl", rows), tmp_path / "out",
                   features=str(features))
    out = {r["id"]: r for r in read_output(tmp_path / "out")}
    with_images = [k for k, r in out.items() if r["image_key"]]
    assert len(with_images) == 4
    for key in with_images:  # every image found: in the readable file or, for the others, in the store
        assert out[key]["image_status"] == "cached", out[key]
        assert [u["source"] for u in out[key]["visual_units"]][:3] == ["object"] * 3
        fell_back = out[key]["image_key"] in lost
        assert ("features" in out[key]["error_kinds"]) == fell_back, out[key]
        if fell_back:
            assert Path(bad).name in out[key]["error"] and "store and detector instead" in out[key]["error"]
    assert "looked up in the pipeline's store and detector instead" in result["summary"]
    assert lost and result["counts"]["error:features"] == sum(out[k]["image_key"] in lost for k in with_images)
    # the Ray engine's stages, run in this process: the same fallback, the same rows
    from dataclasses import asdict

    import pyarrow as pa

    from spacy_agban.tagging.posts import open_input, plan_parts, segments_to_json
    from spacy_agban.tagging.ray_engine import ObjectsActor, read_part_batch

    reads = models.describe_pipeline(str(objects_models["nodet"]))
    source = open_input(tmp_path / "posts.jsonl", core.PostColumns())
    (part,) = plan_parts(source, 10)
    read = read_part_batch(pa.table({"part": [0], "segments": [segments_to_json(part)]}),
                           {"files": list(source.files), "fmt": source.fmt, "columns": asdict(source.columns)},
                           reads.loader_kwargs())
    staged = ObjectsActor(reads, str(features), use_gpu=False)(read).to_pydict()
    for i, key in enumerate(staged["image_key"]):
        if key:
            assert staged["image_status"][i] == "cached"
            assert any(e.startswith("features: ") for e in staged["errors"][i]) == (key in lost)


def test_a_features_file_that_fails_past_its_keys_costs_only_its_images(objects_models, tmp_path,
                                                                        monkeypatch) -> None:
    import pyarrow.parquet as pq

    from spacy_agban.detection.store import FeatureStore
    from spacy_agban.tagging.features import FeatureDataset, export_store

    (sig,) = FeatureStore(objects_models["store"]).signatures()
    export_store(str(objects_models["store"]), str(tmp_path / "f"), rows_per_file=2)
    dataset = FeatureDataset(str(tmp_path / "f"))
    first, second = dataset.files(sig)
    keys = sorted(dataset.keys(sig))
    read_table = pq.read_table

    def fails_on_second(path, *args, **kwargs):
        if path == second and kwargs.get("filters") is not None:
            raise OSError("checksum mismatch")
        return read_table(path, *args, **kwargs)

    monkeypatch.setattr(pq, "read_table", fails_on_second)
    found = dataset.get_many(keys, sig)
    unread = dataset.take_unread()
    assert set(found) | set(unread) == set(keys)
    assert len(found) == 2 and set(unread).isdisjoint(found)
    assert all("checksum mismatch" in why and second in why for why in unread.values())
    assert dataset.take_unread() == {}
    # found again later: the file is not read again, its images are still noted
    assert sorted(dataset.get_many(keys, sig)) == sorted(found) and set(dataset.take_unread()) == set(unread)


# -- repeated ids ---------------------------------------------------------------------------------


def test_repeated_ids_are_counted_and_unique_ids_refuses_them(two_models, tmp_path) -> None:
    model, _ = two_models
    rows = posts(4) + [{"id": "p1", "text": "again"}, {"id": 7, "text": "an int"}, {"id": "7", "text": "a str"},
                       {"text": "no id: named by its place"}, {"text": "nor this one"}]
    source = write_jsonl(tmp_path / "posts.jsonl", rows)
    with pytest.warns(DuplicateIdsWarning, match=r"2 post\(s\) of the input repeat an earlier post's id "
                                                  r"\(posts.jsonl:5 repeats the id of posts.jsonl:2\)"):
        result = local(model, source, tmp_path / "out")
    assert result["duplicate_ids"] == 2 and "warning: 2 post(s)" in result["summary"]
    assert len(read_output(tmp_path / "out")) == len(rows)  # each post still has its row
    for engine in ENGINES.values():
        with pytest.raises(InputError, match="--unique-ids is given"):
            engine(model, source, tmp_path / "strict", unique_ids=True)
        assert not (tmp_path / "strict").exists()
    _no_cluster_started()


def test_repeated_ids_in_parquet_and_on_the_command_line(two_models, tmp_path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from spacy_agban.cli import app

    model, _ = two_models
    pq.write_table(pa.table({"id": ["a", "b", "a", None], "text": ["x", "y", "z", "w"]}), tmp_path / "p.parquet")
    strict = CliRunner().invoke(app, ["tag", str(model), str(tmp_path / "p.parquet"), str(tmp_path / "o1"),
                                      "--unique-ids"])
    assert type(strict.exception) is SystemExit and strict.exit_code == 1, strict.output
    (line,) = strict.output.strip().splitlines()
    assert "p.parquet:row2 repeats the id of p.parquet:row0" in line and not (tmp_path / "o1").exists()
    warned = CliRunner().invoke(app, ["tag", str(model), str(tmp_path / "p.parquet"), str(tmp_path / "o2")])
    assert warned.exit_code == 0, warned.output
    assert "tag: warning: 1 post(s) of the input repeat" in warned.output and "tag (local): 4 posts" in warned.output


# -- what the pipeline reads, decided once --------------------------------------------------------


def test_a_job_reads_the_saved_config_once_and_workers_not_at_all(objects_models, tmp_path, monkeypatch) -> None:
    from spacy_agban.tagging.ray_engine import ObjectsActor, TagActor

    reads_of_config = []
    read_config = models.read_config

    def counted(model):
        reads_of_config.append(model)
        return read_config(model)

    monkeypatch.setattr(models, "read_config", counted)
    source = write_jsonl(tmp_path / "posts.jsonl", posts(3))
    local(objects_models["model"], source, tmp_path / "out", image_root=str(objects_models["root"] / "images"))
    assert len(reads_of_config) == 1
    reads = models.describe_pipeline(str(objects_models["model"]), image_root=str(objects_models["root"] / "images"))
    assert reads.reads_objects and reads.has_detector and reads.signature and reads.agban == "agban"
    assert reads.loader_kwargs()["image_root"] == str((objects_models["root"] / "images").resolve())
    monkeypatch.setattr(models, "read_config", lambda model: pytest.fail("a worker read the config"))
    assert ObjectsActor(reads, None, use_gpu=False).units.signature == reads.signature
    assert TagActor(reads, batch_size=4).nlp.pipe_names == list(reads.components)
