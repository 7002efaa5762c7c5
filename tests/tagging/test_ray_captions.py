"""``tag --engine ray`` with a pipeline that captions images: a stage of caption actors
between reading and tagging gives the same rows as the local engine, every post once,
and the store the caption actors fill serves a second job."""
import os
from collections import Counter

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("pyarrow")

from batch_support import write_jsonl  # noqa: E402
from caption_support import build_captioning_pipeline, image_only_posts  # noqa: E402
from spacy_agban.tagging.local import run_local  # noqa: E402
from spacy_agban.tagging.posts import read_output  # noqa: E402
from spacy_agban.tagging.ray_engine import RayOptions, run_ray  # noqa: E402

TIMEOUT = 600
#: As in test_ray_engine: worker settings for a machine whose cores other jobs keep busy.
SMALL_MACHINE_ENV = {"RAY_worker_niceness": "0", "RAY_worker_register_timeout_seconds": "600",
                     "RAY_prestart_worker_first_driver": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
NAMES = ["102.jpg", "106.jpg", "130.jpg", "149.jpg", "102.jpg", "missing.jpg", "113.jpg", "106.jpg"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_captions")
    model = build_captioning_pipeline(root)
    rows = image_only_posts(NAMES) + [{"id": "given", "text": "Kolo is here", "image": "130.jpg",
                                       "caption": "a dog playing on the grass"}, {"id": "text", "text": "Hi"}]
    source = write_jsonl(root / "posts.jsonl", rows)
    # The caption store of every process of the module, the workers' included (they
    # inherit the environment of the cluster this process starts).
    saved = {k: os.environ.get(k) for k in (*SMALL_MACHINE_ENV, "SPACY_AGBAN_CACHE")}
    os.environ.update({**SMALL_MACHINE_ENV, "SPACY_AGBAN_CACHE": str(root / "cache")})
    ray.init(num_cpus=6, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield {"root": root, "model": model, "source": source}
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT)
def test_ray_captions_image_only_posts_like_the_local_engine(world) -> None:
    root, model, source = world["root"], world["model"], world["source"]
    options = RayOptions(tag_actors=1, caption_actors=1, batch_size=3, caption_batch_size=3)
    result = run_ray(str(model), str(source), str(root / "ray"), options=options, part_size=4)
    rows = read_output(root / "ray")
    ids = [r["id"] for r in rows]
    assert ids == [f"p{i}" for i in range(len(NAMES))] + ["given", "text"] and max(Counter(ids).values()) == 1
    counts = Counter(result["counts"])
    assert counts["caption:failed"] == 0 and counts["error:image_missing"] == 1
    assert counts["caption:generated"] + counts["caption:cached"] == 7 and counts["caption:generated"] >= 5
    out = {r["id"]: r for r in rows}
    for key in ("p0", "p1", "p2", "p3", "p4", "p6", "p7"):
        assert {u["source"] for u in out[key]["visual_units"]} == {"caption"}, key
    # the caption actors wrote the store: the local engine generates nothing and tags the same
    local = run_local(str(model), source, root / "local", part_size=4, batch_size=3, progress=False)
    assert local["counts"].get("caption:generated", 0) == 0 and local["counts"]["caption:cached"] == 7
    assert "captions of images: 7 read from the caption store" in local["summary"]
    assert read_output(root / "local") == rows


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT)
def test_ray_caption_actors_read_the_features_dataset_before_their_store(world) -> None:
    """A dataset holding a caption of each image (another machine's, here a known text):
    the caption actors read it first, caption nothing and the text reaches agban."""
    import hashlib

    from spacy_agban.tagging.features import CaptionDataset
    from spacy_agban.tagging.models import describe_pipeline, load_captioner

    root, model, source = world["root"], world["model"], world["source"]
    captioner = load_captioner(describe_pipeline(str(model)))
    images = root / "images"
    keys = [hashlib.sha256((images / name).read_bytes()).hexdigest() for name in set(NAMES) - {"missing.jpg"}]
    dataset = CaptionDataset(str(root / "features"), writable=True)
    dataset.put_many([(key, "a dog playing on the grass") for key in keys], captioner.signature,
                     captioner.description())
    options = RayOptions(tag_actors=1, caption_actors=1, batch_size=3, caption_batch_size=3)
    result = run_ray(str(model), str(source), str(root / "ray-features"), options=options, part_size=4,
                     features=str(root / "features"))
    counts = Counter(result["counts"])
    assert counts["caption:cached"] == 7 and counts["caption:generated"] == 0
    out = {r["id"]: r for r in read_output(root / "ray-features")}
    for key in ("p0", "p1", "p2", "p3", "p4", "p6", "p7"):
        assert [u["label"] for u in out[key]["visual_units"]] == ["dog", "playing", "grass"], key
