"""Bulk tagging speed: the single-machine ``tag`` against ``tag --engine ray``.

With 1 and 2 actors per stage, on the same posts, in one run; plus a scaling table
on paper for N GPU nodes computed from the measured per-stage costs.

    OMP_NUM_THREADS=1 python -m benchmarks.batch_speed --posts 96

Writes metrics/batch_speed.json and metrics/batch_speed.md.

What is real: the code paths of both engines end to end (posts JSONL -> image
bytes + sha256 -> detection -> nlp.pipe -> Parquet), a full-size AGBAN model
(configs' default sizes: hidden 200, GBAN 200) with caption and object units,
and a torchvision Faster R-CNN MobileNet-v3 detector on every image (an empty
feature store, distinct images: nothing is cached). What is not: the detector
and model weights are random (the work per image and per post is the real one,
the predictions mean nothing), the images synthetic 400x300 JPEGs, and
everything runs on this machine's CPUs (no GPU), which other jobs share.
"""
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Type

import numpy
import typer

from ._common import ROOT, load_average, machine, without_machine_paths

WORDS = ["dog", "beach", "man", "city", "tower", "night", "phone", "store", "game", "crowd", "car", "river"]
NAMES = [("Kolo", "PER"), ("Paris", "LOC"), ("Apple", "ORG"), ("Obama", "PER"), ("Chicago", "LOC"),
         ("NBA", "ORG"), ("Messi", "PER"), ("London", "LOC")]
#: Assumed, not measured here (no GPU in this task): Mask R-CNN R50-FPN at 800 px,
#: fp16, box branch only (the mask head is skipped), batches of 8, one A100/H100-class GPU.
ASSUMED_GPU_IMAGES_PER_SECOND = 20.0
#: An assumed GPU node for the paper table.
NODE_CPUS = 8


# ----- timed Ray stages ------------------------------------------------------------------
# Injected through ``Stages`` (the product's stages carry no timing code). Each call appends
# its rows, images and seconds to ``<folder>/<stage>-<pid>.jsonl``. Built at run time and
# sent by value (``register``), so the Ray workers need not import the benchmarks package.
def _record(folder: str, stage: str, rows: int, seconds: float, images: int = 0) -> None:
    line = json.dumps({"stage": stage, "rows": rows, "images": images, "seconds": seconds, "pid": os.getpid()})
    with open(os.path.join(folder, f"{stage}-{os.getpid()}.jsonl"), "a") as handle:
        handle.write(line + "\n")


def timed_function(fn: Callable[..., Any], stage: str, folder: str) -> Callable[..., Any]:
    def run(table: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = fn(table, **kwargs)
        images = sum(k is not None for k in out["image_key"].to_pylist()) if "image_key" in out.column_names else 0
        _record(folder, stage, out.num_rows, time.perf_counter() - start, images)
        return out

    return run


def timed_actor(base: Type[Any], stage: str, folder: str) -> Type[Any]:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        base.__init__(self, *args, **kwargs)
        _record(folder, f"{stage}_init", 0, time.perf_counter() - start)

    def __call__(self: Any, table: Any) -> Any:
        start = time.perf_counter()
        out = base.__call__(self, table)
        detected = sum(s == "detected" for s in out["image_status"].to_pylist()) if "image_status" in out.column_names else 0
        _record(folder, stage, table.num_rows, time.perf_counter() - start, detected)
        return out

    return type(f"Timed{base.__name__}", (base,), {"__init__": __init__, "__call__": __call__})


def register_timed_stages() -> None:
    """Send this module's functions and classes to the Ray workers by value."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ----- the job ---------------------------------------------------------------------------
def make_inputs(work: Path, n_posts: int, seed: int = 0) -> Path:
    from PIL import Image

    rng = numpy.random.default_rng(seed)
    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_posts):
        pixels = rng.integers(0, 255, (300, 400, 3), dtype="uint8")  # distinct: distinct hashes
        Image.fromarray(pixels).save(images / f"{i}.jpg", quality=85)
        name, _ = NAMES[i % len(NAMES)]
        words = rng.choice(WORDS, size=3, replace=False)
        rows.append({"id": f"post{i}", "text": f"Great day with {name} at the {words[0]} near the {words[1]} #fun",
                     "image": f"{i}.jpg", "caption": f"a {words[0]} and a {words[2]} in the {words[1]}"})
    path = work / "posts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_pipeline(work: Path, min_size: int) -> Path:
    """A full-size agban pipeline with caption units (random 50-d vectors) and object
    units (an empty store + a random-weight MobileNet detector saved to a file)."""
    import warnings

    import spacy
    import torch
    from safetensors.torch import save_file
    from spacy.training import Example

    import spacy_agban  # noqa: F401
    from spacy_agban.detection.detector import make_fasterrcnn_mobilenet_detector

    torch.manual_seed(0)
    detector = {"top_k": 3, "score_threshold": 0.0, "min_size": min_size,
                "max_size": round(min_size * 1333 / 800), "device": "cpu", "batch_size": 4}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = make_fasterrcnn_mobilenet_detector(weights=None, **detector)
    weights = work / "detector.safetensors"
    save_file({k: v.contiguous() for k, v in det.model.state_dict().items()}, str(weights))
    nlp = spacy.blank("en")
    rng = numpy.random.default_rng(0)
    nlp.vocab.reset_vectors(width=50)
    for word in WORDS + [n.lower() for n, _ in NAMES] + ["great", "day"]:
        nlp.vocab.set_vector(word, rng.normal(size=50).astype("float32"))
    units = {"@misc": "spacy_agban.ObjectUnits.v1", "store": str(work / "objects.sqlite"),
             "image_root": str(work / "images"), "top_k": 3,
             "detector": {"@misc": "spacy_agban.FasterRCNNMobileNetDetector.v1", "weights": str(weights), **detector}}
    # the paper's full-size AGBAN over objects (the agban_objects model of configs/variants.yml)
    model = {"fusion": "gban", "adversarial": True}
    nlp.add_pipe("agban", config={"model": model, "object_units": units})
    examples = []
    for i, (name, label) in enumerate(NAMES):
        doc = nlp.make_doc(f"Great day with {name} today")
        doc._.image, doc._.image_caption = f"{i}.jpg", "a dog on the beach"
        examples.append(Example.from_dict(doc, {"entities": [(15, 15 + len(name), label)]}))
    nlp.initialize(lambda: examples)
    path = work / "model"
    nlp.to_disk(path)
    return path


def stage_table(folder: Path) -> Dict[str, Dict[str, float]]:
    """Per stage: calls, rows, images, busy seconds, processes, from the timing files."""
    stages: Dict[str, Dict[str, Any]] = defaultdict(lambda: {"rows": 0, "images": 0, "seconds": 0.0, "pids": set()})
    for path in folder.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            stage = stages[entry["stage"]]
            stage["rows"] += entry["rows"]
            stage["images"] += entry["images"]
            stage["seconds"] += entry["seconds"]
            stage["pids"].add(entry["pid"])
    return {name: {"rows": s["rows"], "images": s["images"], "busy_seconds": round(s["seconds"], 3),
                   "processes": len(s["pids"])} for name, s in stages.items()}


def empty_store(store: Path) -> None:
    """Replace the pipeline's SQLite store by an empty one (its -wal/-shm files too)."""
    from spacy_agban.detection.store import FeatureStore

    for suffix in ("", "-wal", "-shm"):
        Path(str(store) + suffix).unlink(missing_ok=True)
    FeatureStore(store).close()


def run_local_once(model: Path, posts: Path, out: Path, store: Path) -> Dict[str, Any]:
    from spacy_agban.tagging.local import run_local

    store.unlink(missing_ok=True)
    for suffix in ("-wal", "-shm"):
        Path(str(store) + suffix).unlink(missing_ok=True)
    start = time.perf_counter()
    result = run_local(str(model), posts, out, part_size=10000, batch_size=32, progress=False)
    wall = time.perf_counter() - start  # pipeline load included
    stages = {name: {"rows": result["posts"], "images": result["counts"].get("image:detected", 0),
                     "busy_seconds": round(sec, 3), "processes": 1}
              for name, sec in result["stage_seconds"].items()}
    return {"engine": "local", "actors_per_stage": 1, "wall_seconds": round(wall, 2),
            "job_seconds": round(result["seconds"], 2), "posts": result["posts"],
            "images_detected": result["counts"].get("image:detected", 0), "stages": stages}


def run_ray_once(model: Path, posts: Path, out: Path, actors: int, timings: Path,
                 features: Any = None, part_size: int = 10000) -> Dict[str, Any]:
    from spacy_agban.tagging.ray_engine import ObjectsActor, RayOptions, Stages, TagActor, read_part_batch, run_ray

    timings.mkdir(parents=True, exist_ok=True)
    register_timed_stages()
    folder = str(timings)
    stages = Stages(read=timed_function(read_part_batch, "load", folder),
                    objects=timed_actor(ObjectsActor, "detect", folder), tag=timed_actor(TagActor, "tag", folder))
    start = time.perf_counter()
    options = RayOptions(num_gpus=0, detect_actors=actors, tag_actors=actors, batch_size=32, detect_batch_size=8)
    result = run_ray(str(model), str(posts), str(out), options=options, stages=stages,
                     features=str(features) if features else None, part_size=part_size)
    wall = time.perf_counter() - start  # cluster start and shutdown included
    return {"engine": "ray", "actors_per_stage": actors, "wall_seconds": round(wall, 2),
            "job_seconds": round(result["seconds"], 2), "posts": result["posts"],
            "images_detected": result["counts"].get("image:detected", 0),
            "images_read": result["counts"].get("image:cached", 0),
            "parts_skipped": result["parts_skipped"], "parts_written": result["parts_written"],
            "stages": stage_table(timings)}


def rates(run: Dict[str, Any]) -> Dict[str, Any]:
    """Per stage: posts/s and images/s of one process while busy, and of the stage
    (its processes together, if they were busy in parallel)."""
    out = {}
    for name in ("load", "detect", "tag"):
        stage = run["stages"].get(name)
        if not stage or stage["busy_seconds"] <= 0:
            continue
        per_process = stage["rows"] / stage["busy_seconds"]
        out[name] = {"posts_per_s_per_process": round(per_process, 2),
                     "images_per_s_per_process": round(stage["images"] / stage["busy_seconds"], 2),
                     "processes": stage["processes"],
                     "stage_posts_per_s": round(per_process * stage["processes"], 2)}
    for name in ("detect_init", "tag_init"):
        if name in run["stages"]:
            stage = run["stages"][name]
            out[name] = {"seconds_per_actor": round(stage["busy_seconds"] / max(1, stage["processes"]), 2)}
    return out


def paper_table(local: Dict[str, Any]) -> List[Dict[str, Any]]:
    """N GPU nodes, each 1 GPU + NODE_CPUS cores: 1 core to the detect actor, 1 to I/O
    (read, parse, image bytes), the rest to tag actors. Per-core CPU costs: measured
    (the local run); GPU detection: assumed."""
    tag_rate = local["rates"]["tag"]["posts_per_s_per_process"]
    load_rate = local["rates"]["load"]["posts_per_s_per_process"]
    tag_actors = NODE_CPUS - 2
    per_node = min(ASSUMED_GPU_IMAGES_PER_SECOND, tag_actors * tag_rate, 1 * load_rate)
    limit = min((ASSUMED_GPU_IMAGES_PER_SECOND, "GPU detection"), (tag_actors * tag_rate, "CPU tagging"),
                (load_rate, "image I/O"))[1]
    rows = []
    for nodes in (1, 2, 4, 8, 16, 32):
        total = nodes * per_node
        rows.append({"gpu_nodes": nodes, "posts_per_s": round(total, 1),
                     "hours_for_10M_posts": round(10_000_000 / total / 3600, 2), "bound_by": limit})
    return rows


def write_markdown(report: Dict[str, Any], path: Path) -> None:
    lines = [
        "# Bulk tagging speed: one machine against Ray Data",
        "",
        f"Measured on: {report['machine']['date']}, {report['machine']['cpu']}, {report['machine']['cores']} cores "
        f"shared with other jobs (load average {report['load_average_before']} before, "
        f"{report['load_average_after']} after), OMP_NUM_THREADS=1, no GPU; Ray {report['ray']}.",
        f"Input: {report['posts']} posts, each with its own synthetic 400x300 JPEG and a caption; a full-size "
        f"AGBAN model (random weights); detector {report['detector']} (random weights, empty store: every image "
        "is detected). Command: `" + report["command"] + "`.",
        "",
        "## End to end (measured)",
        "",
        "| engine | actors per stage | posts tagged | images detected | images read from features | parts skipped | wall s (all in) | job s | posts/s (job) | posts/s (all in) | Ray overhead vs local, s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    local_wall = report["runs"][0]["wall_seconds"]
    report["runs"][0].setdefault("images_read", 0)
    for run in report["runs"]:
        overhead = "" if run["engine"] == "local" else f"{run['wall_seconds'] - local_wall:+.1f}"
        lines.append(f"| {run['engine']} | {run['actors_per_stage']} | {run['posts']} | {run['images_detected']} | "
                     f"{run.get('images_read', '')} | {run.get('parts_skipped', '')} | {run['wall_seconds']} | "
                     f"{run['job_seconds']} | {run['posts'] / run['job_seconds']:.2f} | "
                     f"{run['posts'] / run['wall_seconds']:.2f} | {overhead} |")
    lines += [
        "",
        "wall s (all in): from the call to the output on disk: local includes loading the pipeline; Ray includes "
        "starting and stopping the local cluster and each actor's loading. job s: local, after loading; Ray, "
        "from submitting the dataset to the written Parquet (actor start-up included). The first Ray run "
        "fills a features dataset that the features-read run then reads (same images, nothing detected); "
        "the resumed run finds 4 of its 8 parts written (the state a killed job leaves) and redoes the others.",
        "",
        "## Per stage (measured; busy time inside each stage's calls)",
        "",
        "| engine | actors | stage | processes | posts/s per process | images/s per process | stage posts/s | actor load s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        for stage in ("load", "detect", "tag"):
            r = run["rates"].get(stage)
            if not r:
                continue
            init = run["rates"].get(f"{stage}_init", {}).get("seconds_per_actor", "")
            images = r["images_per_s_per_process"] if stage != "tag" else "-"
            lines.append(f"| {run['engine']} | {run['actors_per_stage']} | {stage} | {r['processes']} | "
                         f"{r['posts_per_s_per_process']} | {images} | "
                         f"{r['stage_posts_per_s']} | {init} |")
    lines += [
        "",
        "load: read the image bytes and hash them; detect: decode + detector (every image a miss); tag: "
        "`nlp.pipe` with the objects as columns, output rows. Stage posts/s = per process x processes: what the "
        "stage gives when its actors run in parallel, which 2 shared cores only partly allow.",
        "",
        "Reading it: the Ray overhead is mostly fixed (starting the cluster, the workers and each actor's "
        "pipeline or detector load, slow on shared cores), not per post; a second actor per stage adds "
        "nothing when the 2 cores are already busy (and other jobs shared them during this run). The "
        "per-post costs inside the stages are the same code in both engines (`spacy_agban/tagging/core.py`); "
        "they differ here by the CPU share each process got.",
        "",
        "## N GPU nodes (computed, on paper)",
        "",
        f"Each node: 1 GPU running one detect actor, {NODE_CPUS} CPU cores: 1 for the detect actor, 1 for I/O "
        f"(read, parse, image bytes), {NODE_CPUS - 2} tag actors. GPU detection: **assumed** "
        f"{ASSUMED_GPU_IMAGES_PER_SECOND:g} images/s per GPU (Mask R-CNN R50-FPN, 800 px, fp16, box branch only, "
        "batches of 8; not measured here). CPU costs per core: **measured** above (local run: tag "
        f"{report['local_tag_rate']} posts/s, image bytes {report['local_load_rate']} posts/s per core). One image "
        "per post; reading posts and writing Parquet from an object store assumed not to be the bottleneck; "
        "linear in nodes (the stages share nothing but the object store).",
        "",
        "| GPU nodes | posts/s | hours for 10M posts | bound by |",
        "|---|---|---|---|",
    ]
    for row in report["paper"]:
        lines.append(f"| {row['gpu_nodes']} | {row['posts_per_s']} | {row['hours_for_10M_posts']} | {row['bound_by']} |")
    lines.append("")
    path.write_text("\n".join(lines))


def rewrite_markdown(report_json: Path) -> None:
    """Rebuild the .md beside a report's .json (after a change of wording, not of numbers)."""
    write_markdown(json.loads(report_json.read_text()), report_json.with_suffix(".md"))


def main(
    posts: int = typer.Option(96, help="Posts (each with its own image)"),
    min_size: int = typer.Option(480, help="Detector input size (short side)"),
    work: Path = typer.Option(None, help="Work folder (default: a temporary one, removed after)"),
    out: Path = typer.Option(ROOT / "metrics" / "batch_speed", help="Report path without suffix"),
    ray_actors: str = typer.Option("1,2", help="Actors per stage of the Ray runs (comma-separated; the first fills the features dataset)"),
) -> None:
    import ray

    temporary = work is None
    work = Path(tempfile.mkdtemp(prefix="bench_batch_")) if temporary else work
    work.mkdir(parents=True, exist_ok=True)
    before = load_average()
    try:
        posts_path = make_inputs(work, posts)
        model = make_pipeline(work, min_size)
        runs = [run_local_once(model, posts_path, work / "out_local", work / "objects.sqlite")]
        empty_store(work / "objects.sqlite")  # the first Ray run detects every image, as the local one did
        features = work / "features"  # filled by the first Ray run, read by the ones after
        part_size = max(1, posts // 8)
        counts = [int(a) for a in ray_actors.split(",")]
        for k, actors in enumerate(counts):
            runs.append(run_ray_once(model, posts_path, work / f"out_ray{actors}", actors, work / f"timings{actors}",
                                     features=features if k == 0 else None, part_size=part_size))
        # the same job again over the same images: features read, nothing detected
        hit = run_ray_once(model, posts_path, work / "out_hit", 1, work / "timings_hit", features=features,
                           part_size=part_size)
        hit["engine"] = "ray (features read)"
        runs.append(hit)
        # resuming: the first Ray job's folder with its last 4 of 8 parts gone (as a killed job leaves it)
        resume_out = work / "out_resume"
        shutil.copytree(work / f"out_ray{counts[0]}", resume_out)
        for part in sorted(resume_out.glob("part-*.parquet"))[4:]:
            part.unlink()
        resumed = run_ray_once(model, posts_path, resume_out, 1, work / "timings_resume", features=features,
                               part_size=part_size)
        resumed["engine"] = "ray (resumed, 4 of 8 parts done)"
        runs.append(resumed)
        for run in runs:
            run["rates"] = rates(run)
            typer.echo(f"{run['engine']} x{run['actors_per_stage']}: {run['wall_seconds']} s all in, "
                       f"{run['job_seconds']} s job; {run['rates']}")
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    info = machine()
    report = {
        "machine": {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "cpu": info.get("cpu", ""),
                    "cores": os.cpu_count()},
        "load_average_before": before, "load_average_after": load_average(), "ray": ray.__version__,
        "posts": posts, "detector": f"Faster R-CNN MobileNet-v3 FPN at {min_size} px",
        "command": "OMP_NUM_THREADS=1 python -m benchmarks.batch_speed " + without_machine_paths(" ".join(sys.argv[1:])),
        "runs": runs,
        "local_tag_rate": runs[0]["rates"]["tag"]["posts_per_s_per_process"],
        "local_load_rate": runs[0]["rates"]["load"]["posts_per_s_per_process"],
        "assumed_gpu_images_per_second": ASSUMED_GPU_IMAGES_PER_SECOND, "node_cpus": NODE_CPUS,
        "measured": ["runs"], "computed": ["paper"], "assumed": ["assumed_gpu_images_per_second", "node_cpus"],
    }
    report["paper"] = paper_table(runs[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, out.with_suffix(".md"))
    typer.echo(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    typer.run(main)
