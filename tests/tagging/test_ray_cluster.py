"""``tag --engine ray`` past one machine, by simulation: a 3-node Ray cluster on this
machine (``ray.cluster_utils.Cluster``), one node carrying a custom resource that
stands in for a GPU. Detect actors must land there only, tag actors elsewhere, and
removing a worker node mid-run must lose no row."""
import threading
import time
from collections import Counter

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("pyarrow")

import ray_stages  # noqa: E402
from batch_support import build_objects_pipeline, posts, write_jsonl  # noqa: E402
from spacy_agban.tagging.posts import read_output  # noqa: E402
from spacy_agban.tagging.ray_engine import ObjectsActor, RayOptions, Stages, TagActor, run_ray  # noqa: E402

pytestmark = pytest.mark.slow  # a simulated three-node Ray cluster

N_POSTS = 24
SMALL_MACHINE_ENV = {"RAY_worker_niceness": "0", "RAY_worker_register_timeout_seconds": "600",
                     "RAY_prestart_worker_first_driver": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


@pytest.fixture
def three_nodes(monkeypatch):
    from ray.cluster_utils import Cluster

    for key, value in SMALL_MACHINE_ENV.items():
        monkeypatch.setenv(key, value)
    if ray.is_initialized():
        ray.shutdown()
    # The head alone has the CPUs the stages ask for (2 tag actors x 1 + 1 for the read
    # tasks): once the worker is removed, its tag actor is restarted on the head and the
    # read tasks still find a CPU. With 2 CPUs on the head they waited for the tag actors'
    # CPUs: the run took 122 s instead of 57 s on an idle machine, and timed out under load.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": False})
    # the "GPU" node: a custom resource and no CPU to lend, so only detect actors (which
    # ask for the resource and no CPU) can run there
    detect_node = cluster.add_node(num_cpus=0, resources={"detect_node": 1})
    worker = cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(ray_stages)
    try:
        yield cluster, detect_node, worker
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.timeout(420)
def test_tag_on_three_nodes_detects_on_the_detect_node_and_survives_losing_a_worker(three_nodes, tmp_path) -> None:
    cluster, detect_node, worker = three_nodes
    model = build_objects_pipeline(tmp_path / "pipeline", steps=10)
    source = write_jsonl(tmp_path / "posts.jsonl", posts(N_POSTS))
    places = tmp_path / "places"
    places.mkdir()
    out = tmp_path / "out"
    stages = Stages(objects=ray_stages.placed(ObjectsActor, "objects", places),
                    tag=ray_stages.placed(ray_stages.slowed(TagActor, 0.5), "tag", places))
    options = RayOptions(detect_actors=1, detect_cpus=0, detect_resources={"detect_node": 1}, num_gpus=0,
                         tag_actors=2, tag_cpus=1, batch_size=3, detect_batch_size=3)
    removed = {}

    def remove_worker_mid_run() -> None:
        deadline = time.monotonic() + 300
        while not list(out.glob("part-*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.1)
        removed["parts_before"] = len(list(out.glob("part-*.parquet")))
        removed["tag_on_worker"] = worker.node_id in {p.read_text() for p in places.glob("tag-*")}
        cluster.remove_node(worker)
        removed["done"] = True

    thread = threading.Thread(target=remove_worker_mid_run, daemon=True)
    thread.start()
    result = run_ray(str(model), str(source), str(out), part_size=3, options=options, stages=stages)
    thread.join(60)
    assert removed.get("done") and removed["parts_before"] < N_POSTS // 3, removed
    rows = read_output(out)
    ids = Counter(r["id"] for r in rows)
    assert sorted(ids) == sorted(f"p{i}" for i in range(N_POSTS)) and set(ids.values()) == {1}
    assert result["posts"] == N_POSTS
    objects_nodes = {p.read_text() for p in places.glob("objects-*")}
    tag_nodes = {p.read_text() for p in places.glob("tag-*")}
    assert objects_nodes == {detect_node.node_id}
    assert tag_nodes and detect_node.node_id not in tag_nodes
    assert {r["image_status"] for r in rows} >= {"cached"}
