"""``tag --engine ray`` and ``detect --engine ray`` on one local Ray cluster for the module
(8 logical CPUs and a logical GPU on 2 cores), each job checked against the local engine."""
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("pyarrow")

import ray_stages  # noqa: E402
from batch_support import IMAGES, build_objects_pipeline, posts, write_jsonl  # noqa: E402
from spacy_agban.tagging import core  # noqa: E402
from spacy_agban.tagging.features import FeatureDataset, export_store  # noqa: E402
from spacy_agban.tagging.local import run_local  # noqa: E402
from spacy_agban.tagging.posts import read_output  # noqa: E402
from spacy_agban.tagging.ray_engine import RayOptions, run_ray  # noqa: E402

pytestmark = pytest.mark.slow  # every test starts a Ray cluster

TIMEOUT = 600  # per test, the module's setup included for the first test that needs it
RESUME_TIMEOUT = 300
BAD_IMAGES = {"p3": "missing.jpg", "p9": "broken.jpg", "p14": "../outside.jpg"}
BAD_CAPTIONS = {"p5": "x" * (core.MAX_CAPTION_CHARS + 1), "p11": "y" * (core.MAX_CAPTION_CHARS + 5)}
N_POSTS = 30
OBJECTS = {"cached": "objects", "detected": "objects"}
ADDRESS = re.compile(r" at 0x[0-9a-f]+")  # PIL names the in-memory file it could not read
#: Worker settings for a machine whose cores other jobs keep busy (Ray runs workers at
#: nice 15 and gives them 60 s to register): set by the tests, not by the product.
SMALL_MACHINE_ENV = {"RAY_worker_niceness": "0", "RAY_worker_register_timeout_seconds": "600",
                     "RAY_prestart_worker_first_driver": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


@pytest.fixture(scope="module")
def cluster():
    saved = {k: os.environ.get(k) for k in SMALL_MACHINE_ENV}
    os.environ.update(SMALL_MACHINE_ENV)
    ray.init(num_cpus=8, num_gpus=1, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(ray_stages)
    yield ray
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def copy_sqlite(src: Path, dst: Path) -> Path:
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An objects pipeline (random detector + store of its 4 training images), the
    same pipeline without a detector (its own store, one row damaged), a features
    dataset exported from the store, and two JSONL files of posts with every kind
    of bad row."""
    import spacy

    root = tmp_path_factory.mktemp("ray_world")
    model = build_objects_pipeline(root)
    images = root / "images"
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    shutil.copy(IMAGES / "149.jpg", images / "149.jpg")  # in no store
    (root / "outside.jpg").write_bytes(b"whatever")
    features = root / "features"
    export_store(str(root / "objects.sqlite"), str(features))
    store = copy_sqlite(root / "objects.sqlite", root / "nodet.sqlite")
    nlp = spacy.load(model, config={"components.agban.object_units.detector": None,
                                    "components.agban.object_units.store": str(store)})
    nodet = root / "model_nodet"
    nlp.to_disk(nodet)
    with sqlite3.connect(store) as conn:  # 130.jpg's row damaged: features of the wrong size
        conn.execute("UPDATE detections SET features = x'00' WHERE image_key = ?",
                     (_key(images / "130.jpg"),))
    rows = posts(N_POSTS, images=["102.jpg", "106.jpg", None, "113.jpg", "130.jpg", "149.jpg"])
    for row in rows:
        row["image"] = BAD_IMAGES.get(row["id"], row["image"])
        row["caption"] = BAD_CAPTIONS.get(row["id"], row["caption"])
    inputs = root / "posts"
    inputs.mkdir()
    odd = ['{"id": "s1", "text": "Obama \\ud800 in Chicago", "image": "102.jpg"}', "{broken", ""]
    write_jsonl(inputs / "posts-0.jsonl", rows[:12] + odd + rows[12:15])
    write_jsonl(inputs / "posts-1.jsonl", rows[15:])
    return {"root": root, "model": model, "nodet": nodet, "features": features, "inputs": inputs}


def _key(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def by_id(rows):
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), Counter(ids).most_common(3)
    return {r["id"]: r for r in rows}


def expected_ids():
    return sorted([f"p{i}" for i in range(N_POSTS)] + ["s1", "posts-0.jsonl:14"])


def assert_same_rows(local_rows, ray_rows) -> None:
    local, remote = by_id(local_rows), by_id(ray_rows)
    assert sorted(local) == sorted(remote) == expected_ids()
    for key in local:
        a, b = local[key], remote[key]
        assert a["entities"] == b["entities"], key
        assert a["error_kinds"] == b["error_kinds"], (key, a["error"], b["error"])
        assert ADDRESS.sub("", a["error"] or "") == ADDRESS.sub("", b["error"] or ""), key
        # detected in one batch, read back from the features by later ones: batch
        # boundaries may differ between the engines, the objects may not
        assert OBJECTS.get(a["image_status"], a["image_status"]) == OBJECTS.get(b["image_status"], b["image_status"]), key
        assert [(u["source"], u["label"]) for u in a["visual_units"]] == \
               [(u["source"], u["label"]) for u in b["visual_units"]], key
        for u, v in zip(a["visual_units"], b["visual_units"]):
            assert (u["score"] is None) == (v["score"] is None)
            if u["score"] is not None:
                assert u["score"] == pytest.approx(v["score"], abs=1e-3)


def copy_features(world, name: str) -> str:
    target = world["root"] / name
    shutil.copytree(world["features"], target)
    return str(target)


@pytest.fixture(scope="module")
def detector_job(world, cluster):
    """The objects pipeline with a detector, reading a features dataset first: Ray, then local."""
    ray_features = copy_features(world, "features-ray")
    local_features = copy_features(world, "features-local")
    result = run_ray(str(world["model"]), str(world["inputs"]), str(world["root"] / "ray"), part_size=8,
                     features=ray_features, options=RayOptions(num_gpus=0.5, batch_size=8, detect_batch_size=8))
    local = run_local(str(world["model"]), world["inputs"], world["root"] / "local", part_size=8, batch_size=8,
                      features=local_features, progress=False)
    return {"ray": result, "local": local, "ray_rows": read_output(world["root"] / "ray"),
            "local_rows": read_output(world["root"] / "local"), "features": ray_features}


@pytest.mark.timeout(TIMEOUT)
def test_ray_with_a_detector_equals_local_and_reads_features_first(detector_job) -> None:
    assert_same_rows(detector_job["local_rows"], detector_job["ray_rows"])
    rows = by_id(detector_job["ray_rows"])
    statuses = Counter(r["image_status"] for r in rows.values())
    # the 4 training images are read from the features dataset; 149.jpg (in no store) is
    # detected once, then read back from the dataset by the batches after it
    assert {rows[k]["image_status"] for k in posts_with("102.jpg") + posts_with("130.jpg")} == {"cached"}
    assert {rows[k]["image_status"] for k in posts_with("149.jpg")} <= {"detected", "cached"}
    assert statuses["detected"] >= 1
    counts = detector_job["ray"]["counts"]
    assert counts["image:detected"] == statuses["detected"]
    assert "read from stored features" in detector_job["ray"]["summary"]
    assert f"{statuses['detected']} detected" in detector_job["ray"]["summary"]
    # what the Ray job detected went to the features dataset (never to the SQLite store)
    dataset = FeatureDataset(detector_job["features"])
    (sig,) = dataset.signatures()
    assert dataset.count(sig) == 5


def posts_with(image: str):
    return [r["id"] for r in posts(N_POSTS, images=["102.jpg", "106.jpg", None, "113.jpg", "130.jpg", "149.jpg"])
            if r["image"] == image and r["id"] not in BAD_IMAGES]


@pytest.mark.timeout(TIMEOUT)
def test_ray_error_rows_are_named_like_local(detector_job) -> None:
    rows = by_id(detector_job["ray_rows"])
    assert rows["p3"]["error_kinds"] == ["image_missing"]
    assert rows["p9"]["error_kinds"] == ["image_corrupt"]
    assert rows["p14"]["error_kinds"] == ["image_refused"]
    for key in BAD_CAPTIONS:
        assert rows[key]["error_kinds"] == ["bad_caption"]
    # a lone surrogate: tagged from the text with U+FFFD in its place, and said so
    assert rows["s1"]["error_kinds"] == ["bad_input"] and "surrogate" in rows["s1"]["error"]
    # a line that is not JSON: named by its file and line, on both engines
    broken = rows["posts-0.jsonl:14"]
    assert broken["error_kinds"] == ["bad_input"] and "{broken" in broken["error"]
    for key, row in rows.items():
        if re.fullmatch(r"p\d+", key):
            assert row["entities"], f"{key} was not tagged"
    # the parts keep the input order
    assert [r["id"] for r in detector_job["ray_rows"]] == [r["id"] for r in detector_job["local_rows"]]


@pytest.mark.timeout(TIMEOUT)
def test_ray_without_a_detector_reads_the_sqlite_store_like_local(world, cluster) -> None:
    result = run_ray(str(world["nodet"]), str(world["inputs"]), str(world["root"] / "ray-nodet"), part_size=8,
                     options=RayOptions(num_gpus=0, batch_size=8, detect_batch_size=8))
    local = run_local(str(world["nodet"]), world["inputs"], world["root"] / "local-nodet", part_size=8,
                      batch_size=8, progress=False)
    ray_rows, local_rows = read_output(world["root"] / "ray-nodet"), read_output(world["root"] / "local-nodet")
    assert_same_rows(local_rows, ray_rows)
    rows = by_id(ray_rows)
    assert result["counts"].get("image:detected", 0) == 0 and result["num_gpus_per_detect_actor"] == 0
    assert rows["p5"]["image_status"] == "uncached"  # 149.jpg: in no store, and no detector
    # 130.jpg's damaged store row: its posts get an error (or, with a store that
    # treats a damaged row as a miss, no objects), the rest is read
    damaged = [r for r in rows.values() if r["image_key"] == _key(world["root"] / "images" / "130.jpg")]
    assert damaged and all(r["entities"] for r in damaged)
    assert all(("objects" in r["error_kinds"]) or r["image_status"] == "uncached" for r in damaged)
    assert {r["image_status"] for r in rows.values() if r["id"] in ("p0", "p1", "p6")} == {"cached"}


@pytest.mark.timeout(TIMEOUT)
def test_ray_without_a_detector_reads_the_features_dataset_like_local(world, detector_job) -> None:
    features = detector_job["features"]  # now holds 149.jpg too (the detector job added it)
    result = run_ray(str(world["nodet"]), str(world["inputs"]), str(world["root"] / "ray-feat"), part_size=8,
                     features=features, options=RayOptions(num_gpus=0, batch_size=8, detect_batch_size=8))
    run_local(str(world["nodet"]), world["inputs"], world["root"] / "local-feat", part_size=8, batch_size=8,
              features=features, progress=False)
    ray_rows = read_output(world["root"] / "ray-feat")
    assert_same_rows(read_output(world["root"] / "local-feat"), ray_rows)
    rows = by_id(ray_rows)
    assert rows["p5"]["image_status"] == "cached"  # 149.jpg: in the dataset, not in the store
    assert rows["p4"]["image_status"] == "cached" and not rows["p4"]["error"]  # 130.jpg: the dataset first
    assert result["counts"].get("image:detected", 0) == 0


@pytest.mark.timeout(TIMEOUT)
def test_ray_says_when_the_pipeline_does_not_read_images(world, cluster) -> None:
    from conftest import CAPTION_POSTS, make_examples, make_nlp, train

    nlp = make_nlp()  # captions only: no object units
    train(nlp, make_examples(nlp, CAPTION_POSTS), steps=3)
    model = world["root"] / "caption-model"
    nlp.to_disk(model)
    source = write_jsonl(world["root"] / "caption-posts.jsonl", posts(4, images=["102.jpg", None]))
    result = run_ray(str(model), str(source), str(world["root"] / "ray-caption"), part_size=2,
                     options=RayOptions(batch_size=4))
    assert result["posts"] == 4 and result["counts"].get("images_not_read") == 2
    assert result["summary"].count("does not read images") == 1
    assert "the image of 2 posts was not used" in result["summary"]


RESUME_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import ray.cloudpickle, ray_stages
from spacy_agban.tagging.ray_engine import RayOptions, Stages, TagActor, run_ray
ray.cloudpickle.register_pickle_by_value(ray_stages)
run_ray({model!r}, {inputs!r}, {out!r}, part_size=4, features={features!r},
        options=RayOptions(address={address!r}, num_gpus=0.5, batch_size=4, detect_batch_size=4),
        stages=Stages(tag=ray_stages.slowed(TagActor, 1.0)))
"""


# The test's own time only (func_only): a second driver's start-up, its actors' and the
# rerun's. In a run of the module, the fixtures it shares (the cluster, the world, the
# detector job) were set up within the timeout of the first test above; run alone, their
# set-up is not timed.
@pytest.mark.timeout(RESUME_TIMEOUT, func_only=True)
def test_ray_job_resumes_after_its_driver_is_killed(world, detector_job, cluster) -> None:
    out = world["root"] / "ray-resume"
    script = RESUME_SCRIPT.format(tests=str(Path(__file__).parents[1]), model=str(world["model"]),
                                  inputs=str(world["inputs"]), out=str(out), features=detector_job["features"],
                                  address=ray.get_runtime_context().gcs_address)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + RESUME_TIMEOUT / 2
        while not list(out.glob("part-*.parquet")):
            assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no part written"
            time.sleep(0.2)
        driver.kill()  # SIGKILL: no cleanup of any kind
        driver.wait(30)
    finally:
        if driver.poll() is None:
            driver.kill()
    before = sorted(out.glob("part-*.parquet"))
    total = 8  # 32 posts in parts of 4
    assert 1 <= len(before) < total
    result = run_ray(str(world["model"]), str(world["inputs"]), str(out), part_size=4,
                     features=detector_job["features"],
                     options=RayOptions(num_gpus=0.5, batch_size=4, detect_batch_size=4))
    assert result["parts_skipped"] == len(before) and result["parts_written"] == total - len(before)
    rows = by_id(read_output(out))  # every id exactly once
    assert sorted(rows) == expected_ids()
    # the summary counts the whole output, not only what the rerun tagged
    assert result["posts_in_output"] == len(expected_ids())
    assert f"{len(expected_ids())} posts in all" in result["summary"]
    assert f"in the {len(before)} parts an earlier run wrote" in result["summary"]
    # every image is in the features dataset by now: read, never detected again
    assert result["counts"].get("image:detected", 0) == 0 and result["counts"]["image:cached"] > 0


@pytest.mark.timeout(TIMEOUT)
def test_detect_with_ray_fills_the_features_dataset_and_skips_known_images(world, cluster, tmp_path) -> None:
    from spacy_agban.cli.tag import detect_command
    from spacy_agban.tagging.features import import_dataset
    from spacy_agban.units.objects import ObjectUnits
    from spacy_agban.detection.store import FeatureStore

    images = tmp_path / "images"
    shutil.copytree(world["root"] / "images", images)
    shutil.copy(images / "102.jpg", images / "copy-of-102.jpg")  # the same bytes as a stored one
    (sig,) = FeatureStore(world["root"] / "objects.sqlite").signatures()
    features = copy_features(world, "features-detect")
    args = dict(image_root=None, detector="mobilenet", weights=str(world["root"] / "detector.safetensors"),
                min_size=128, max_size=160, top_k=3, batch_size=4, score_threshold=0.0, device="cpu",
                limit=None, allow_remote=False, engine="ray", num_gpus=0.5, actors=1, address=None)
    summary = detect_command(images, Path(features), **args)
    # the pipeline's detector and the command's have one signature: the 4 stored images
    # (and the copy) are read, 149.jpg is detected, broken.jpg fails
    assert (summary["images"], summary["detected"], summary["cached"], summary["failed"]) == (7, 1, 5, 1)
    dataset = FeatureDataset(features)
    assert set(dataset.signatures()) == {sig} and dataset.count(sig) == 5
    imported = tmp_path / "imported.sqlite"
    assert import_dataset(features, str(imported)) == {sig: 5}
    reader = ObjectUnits(store=imported, image_root=images, signature=sig)
    (outcome,) = reader.detections_for(["149.jpg"])
    assert outcome.status == "cached" and len(outcome.detections) == 3


#: What listens, where, in a local cluster of this Ray (2.60), measured: gRPC servers
#: that Ray binds to every interface with no option to narrow it, and the runtime-env
#: agent, bound to the node's address (Ray turns 127.0.0.1 into it). docs/ray.md says
#: what guards them.
ALL_INTERFACES = ("0.0.0.0", "::")
WILDCARD_COMPONENTS = ("gcs_server", "raylet", "ray::", "python", "pytest")
NODE_ADDRESS_COMPONENTS = ("ray::RuntimeEnvAgent", "runtime_env_agent")


@pytest.mark.timeout(TIMEOUT)
def test_the_local_cluster_listens_only_where_documented(cluster, detector_job) -> None:
    import psutil  # shipped with Ray

    node_ip = ray.util.get_node_ip_address()
    ours = _cluster_processes(psutil)
    assert any(p.name() == "gcs_server" for p in ours.values()) and any(p.name() == "raylet" for p in ours.values())
    listening = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in ours:
            listening.append((_component(ours[conn.pid]), conn.laddr.ip, conn.laddr.port))
    assert listening
    unexpected = []
    for component, ip, port in listening:
        if ip in ("127.0.0.1", "::1"):
            continue
        if ip in ALL_INTERFACES and component.startswith(WILDCARD_COMPONENTS):
            continue
        if ip == node_ip and component.startswith(NODE_ADDRESS_COMPONENTS):
            continue
        unexpected.append((component, ip, port))
    assert not unexpected, f"listening where docs/ray.md does not say: {unexpected}"


GUARD_SCRIPT = """
import ray
try:
    ray.init(address={address!r}, log_to_driver=False)
except Exception as err:
    print("REFUSED", type(err).__name__, err)
else:
    print("ACCEPTED", ray.cluster_resources().get("CPU"))
"""


@pytest.mark.timeout(TIMEOUT)
def test_a_client_without_the_clusters_token_is_refused(cluster) -> None:
    """What guards the ports that listen on every interface: Ray's token authentication."""
    assert os.environ.get("RAY_AUTH_MODE", "token") == "token"
    script = GUARD_SCRIPT.format(address=ray.get_runtime_context().gcs_address)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token-" + "x" * 32}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert "REFUSED" in out.stdout and "ACCEPTED" not in out.stdout, (out.stdout[-2000:], out.stderr[-2000:])


def _cluster_processes(psutil):
    """This test's cluster: the gcs_server and raylet started by this process, and their descendants."""
    me = psutil.Process()
    found = {}
    for child in me.children(recursive=True):
        try:
            if child.name() in ("gcs_server", "raylet"):
                found[child.pid] = child
                for sub in child.children(recursive=True):
                    found[sub.pid] = sub
        except psutil.NoSuchProcess:
            continue
    found[me.pid] = me  # the driver's own core worker listens too
    return found


def _component(proc) -> str:
    try:
        name = proc.name()
        cmd = " ".join(proc.cmdline())
    except Exception:
        return "?"
    if "runtime_env/agent/main.py" in cmd or "runtime_env_agent" in cmd:
        return "ray::RuntimeEnvAgent"
    return name
