"""``tag --engine ray`` and ``detect --engine ray`` on a local Ray cluster (2 cores: one
tag job and one detect job for the whole module, each checked several ways)."""
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from batch_support import IMAGES, build_objects_pipeline, posts  # noqa: E402
from spacy_agban.batch import core  # noqa: E402
from spacy_agban.batch.local import run_local  # noqa: E402
from spacy_agban.batch.posts import read_output  # noqa: E402
from spacy_agban.batch.ray_engine import CRASH_ONCE_ENV, RayOptions, run_ray, small_machine_settings  # noqa: E402

BAD_IMAGES = {"p3": "missing.jpg", "p9": "broken.jpg", "p14": "../outside.jpg"}
BAD_CAPTIONS = {"p5": "x" * (core.MAX_CAPTION_CHARS + 1), "p11": "y" * (core.MAX_CAPTION_CHARS + 5)}
N_POSTS = 40
#: Each test's limit, the module's Ray job included for the first test that runs
#: it: a job that cannot be scheduled fails here instead of blocking CI.
TIMEOUT = 480
ADDRESS = re.compile(r" at 0x[0-9a-f]+")  # PIL names the in-memory file it could not read


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    with small_machine_settings():  # workers at normal priority: the CPUs are shared
        ray.init(num_cpus=8, num_gpus=1, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory, cluster):
    """8 Parquet files of posts with bad images and captions; the local and the Ray
    outputs, the Ray one with its tag actor killed once mid-run."""
    root = tmp_path_factory.mktemp("ray_job")
    model = build_objects_pipeline(root)
    (root / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    rows = posts(N_POSTS)
    for row in rows:
        row["image"] = BAD_IMAGES.get(row["id"], row["image"])
        row["caption"] = BAD_CAPTIONS.get(row["id"], row["caption"])
    inputs = root / "posts"
    inputs.mkdir()
    for k in range(8):
        part = rows[k * 5 : (k + 1) * 5]
        pq.write_table(pa.Table.from_pylist(part), inputs / f"posts-{k}.parquet")
    local = run_local(str(model), inputs, root / "local", progress=False, batch_size=8)
    marker = root / "crashed"
    os.environ[CRASH_ONCE_ENV] = str(marker)
    try:
        result = run_ray(str(model), [str(inputs)], str(root / "ray"),
                         options=RayOptions(num_gpus=0.5, batch_size=8, detect_batch_size=8))
    finally:
        del os.environ[CRASH_ONCE_ENV]
    return {"local": local, "ray": result, "local_rows": read_output(root / "local"),
            "ray_rows": read_output(root / "ray"), "marker": marker, "root": root, "model": model}


def by_id(rows):
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), Counter(ids).most_common(3)
    return {r["id"]: r for r in rows}


@pytest.mark.timeout(TIMEOUT)
def test_ray_job_on_eight_parquet_files_writes_every_post_once(job) -> None:
    assert len(list((job["root"] / "posts").glob("*.parquet"))) == 8
    rows = by_id(job["ray_rows"])
    assert sorted(rows) == sorted(f"p{i}" for i in range(N_POSTS))
    assert job["ray"]["posts"] == N_POSTS and job["ray"]["num_gpus_per_detect_actor"] == 0.5


@pytest.mark.timeout(TIMEOUT)
def test_ray_output_equals_local_output(job) -> None:
    local, remote = by_id(job["local_rows"]), by_id(job["ray_rows"])
    assert local.keys() == remote.keys()
    for key in local:
        a, b = local[key], remote[key]
        assert a["entities"] == b["entities"], key
        assert a["error_kinds"] == b["error_kinds"], key
        assert ADDRESS.sub("", a["error"] or "") == ADDRESS.sub("", b["error"] or ""), key
        assert [(u["source"], u["label"]) for u in a["visual_units"]] == \
               [(u["source"], u["label"]) for u in b["visual_units"]], key
        for u, v in zip(a["visual_units"], b["visual_units"]):
            assert (u["score"] is None) == (v["score"] is None)
            if u["score"] is not None:
                assert u["score"] == pytest.approx(v["score"], abs=1e-3)
    # the local run found the training images in the pipeline's store, Ray detected them
    assert {r["image_status"] for r in local.values()} >= {"cached"}
    assert {r["image_status"] for r in remote.values()} >= {"detected"}


@pytest.mark.timeout(TIMEOUT)
def test_ray_bad_images_and_captions_are_error_rows(job) -> None:
    rows = by_id(job["ray_rows"])
    for key, image in BAD_IMAGES.items():
        assert rows[key]["error"] and image in rows[key]["error"], rows[key]
        assert all(kind.startswith("image_") for kind in rows[key]["error_kinds"])
        assert not any(u["source"] == "object" for u in rows[key]["visual_units"])
    assert rows["p3"]["error_kinds"] == ["image_missing"]
    assert rows["p9"]["error_kinds"] == ["image_corrupt"]
    assert rows["p14"]["error_kinds"] == ["image_refused"]
    for key in BAD_CAPTIONS:
        assert rows[key]["error_kinds"] == ["bad_caption"]
        assert not any(u["source"] == "caption" for u in rows[key]["visual_units"])
    bad = set(BAD_IMAGES) | set(BAD_CAPTIONS)
    for key, row in rows.items():
        assert row["entities"], f"{key} was not tagged"  # every post, bad or not, is tagged from its text
        if key not in bad:
            assert row["error"] is None, row
    counts = job["ray"]["counts"]
    assert counts["error:image_missing"] == 1 and counts["error:bad_caption"] == 2


@pytest.mark.timeout(TIMEOUT)
def test_ray_job_survives_a_killed_actor(job) -> None:
    assert job["marker"].exists()  # a tag actor did call os._exit mid-run
    assert len(by_id(job["ray_rows"])) == N_POSTS


@pytest.mark.timeout(TIMEOUT)
def test_detect_with_ray_fills_the_features_dataset_and_skips_known_images(job, tmp_path) -> None:
    from spacy_agban.batch.features import FeatureDataset, export_store, import_dataset
    from spacy_agban.detection.cli import detect_command
    from spacy_agban.detection.store import FeatureStore

    images = job["root"] / "images"
    shutil.copy(IMAGES / "149.jpg", images / "149.jpg")  # not in the pipeline's store
    shutil.copy(images / "102.jpg", images / "copy-of-102.jpg")  # the same bytes as one that is
    store = FeatureStore(job["root"] / "objects.sqlite")
    (sig,) = store.signatures()
    features = tmp_path / "features"
    assert export_store(str(job["root"] / "objects.sqlite"), str(features)) == {sig: 4}
    args = dict(image_root=None, detector="mobilenet", weights=str(job["root"] / "detector.safetensors"),
                min_size=128, max_size=160, top_k=3, batch_size=4, score_threshold=0.0, device="cpu",
                limit=None, allow_remote=False, engine="ray", num_gpus=0.5, actors=1)
    summary = detect_command(images, features, **args)
    # the pipeline's detector and the command's have one signature: the 4 stored images
    # (and the copy) are skipped, 149.jpg is detected, broken.jpg fails
    assert (summary["images"], summary["detected"], summary["cached"], summary["failed"]) == (7, 1, 5, 1)
    dataset = FeatureDataset(str(features))
    assert set(dataset.signatures()) == {sig} and dataset.count(sig) == 5
    imported = tmp_path / "imported.sqlite"
    assert import_dataset(str(features), str(imported)) == {sig: 5}
    ours = store.get_many(list(dataset.keys(sig)), sig)
    theirs = FeatureStore(imported).get_many(list(dataset.keys(sig)), sig)
    assert len(theirs) == 5 and len(ours) == 4
    for key in ours:
        assert theirs[key].labels == ours[key].labels
    # training here can now use the cluster's features: the pipeline finds 149.jpg stored
    from spacy_agban.detection.object_units import ObjectUnits

    reader = ObjectUnits(store=imported, image_root=images, signature=sig)
    (outcome,) = reader.detections_for(["149.jpg"])
    assert outcome.status == "cached" and len(outcome.detections) == 3
