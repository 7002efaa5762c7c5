"""``tag --engine ray`` and ``detect --engine ray``: the same steps on Ray Data.

    plan parts (driver: the reader of :mod:`.posts`, as the local engine)
      -> read + parse each part, its image bytes + sha256 (tasks, one per part)
      -> captions (actor pool, with an image_captioner: features dataset, caption store, model on the misses)
      -> objects (actor pool: features dataset, store, detector on the misses)
      -> tag (CPU actor pool: the pipeline loaded once per actor)
      -> the driver writes each part once all its rows are back

Every stage runs a function of :mod:`.core` on plain Arrow columns: no
``Language`` or ``Doc`` crosses a process. The output is the local engine's:
numbered parts and ``_job.json`` (:mod:`.job`: what the job depends on, by
content, checked before a cluster is started), so a job that stops
(driver killed, cluster lost) resumes where it stopped with the same command,
and rows keep their input order and ``file:line`` names.

Every actor pool states its ``num_cpus`` and ``num_gpus`` (a GPU actor that
states no CPUs takes a whole one, and on a small machine the other stages then
wait forever) and, if asked, a custom resource that pins it to some nodes; the
task stages state ``num_cpus``. Before running, these needs are checked against
the cluster, so a job that cannot be scheduled fails with a message. A post
whose image, caption, stored features or pipeline call fails becomes a row with
an ``error``; an actor that dies is restarted by Ray and its batch run again.

Ray is imported inside the functions: the package works without it.
"""
import math
import os
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from . import core
from .job import start_job
from .models import PipelineReads, attach_captions, describe_pipeline, load_captioner, load_object_units, load_tagger
from .posts import (
    Input,
    InputError,
    Parts,
    open_input,
    read_part,
    segments_from_json,
    segments_to_json,
)

#: Where each row belongs in the output: its part and its place in that part.
PLACE_COLUMNS = ("part", "row")


@dataclass
class RayOptions:
    """How the job is spread. ``num_gpus``: per objects (detect) actor, fractions
    share a GPU; None: 1 if the cluster has a GPU, else 0. ``detect_resources``:
    custom resources each detect actor asks for (e.g. ``{"detect_node": 1}`` on the
    nodes meant to detect)."""

    address: Optional[str] = None
    num_cpus: Optional[int] = None  # a local cluster's CPUs; default: enough for the stages
    num_gpus: Optional[float] = None
    detect_actors: int = 1
    tag_actors: int = 1
    detect_cpus: float = 1.0
    tag_cpus: float = 1.0
    io_cpus: float = 0.5
    batch_size: int = 64
    detect_batch_size: int = 16
    detect_resources: Dict[str, float] = field(default_factory=dict)
    precision: str = "fp32"  # the tag actors' transformer (spacy_agban.inference.precision)
    # the caption stage (a pipeline with an image_captioner): actors, CPUs and GPUs each
    # (None: 1 if the cluster has a GPU, else 0), images per batch
    caption_actors: int = 1
    caption_cpus: float = 1.0
    caption_gpus: Optional[float] = None
    caption_batch_size: int = 16


@dataclass
class Stages:
    """The stage implementations (tests and benchmarks pass subclasses that fail
    on purpose or time themselves; they must be importable on the workers)."""

    read: Any = None
    objects: Any = None
    tag: Any = None
    caption: Any = None

    def __post_init__(self) -> None:
        self.read = self.read or read_part_batch
        self.objects = self.objects or ObjectsActor
        self.tag = self.tag or TagActor
        self.caption = self.caption or CaptionActor


def needed_cpus(options: RayOptions, detect: bool = True, caption: bool = False) -> float:
    actors = options.tag_actors * options.tag_cpus
    if detect:
        actors += options.detect_actors * options.detect_cpus
    if caption:
        actors += options.caption_actors * options.caption_cpus
    return actors + max(1.0, options.io_cpus)  # plus room for the read/parse/load tasks


@contextmanager
def cluster(options: RayOptions, detect: bool = True, caption: bool = False) -> Iterator[Any]:
    """Join ``options.address``, use the cluster already started in this process,
    or start a local one without a dashboard (shut down after)."""
    import ray

    started = False
    if not ray.is_initialized():
        if options.address:
            ray.init(address=options.address)
        else:
            cpus = options.num_cpus or max(os.cpu_count() or 1, math.ceil(needed_cpus(options, detect, caption)))
            # Ray's servers listen on every interface (it offers no option to narrow
            # that); its token authentication guards them. Ray reads RAY_AUTH_MODE
            # when imported, so it is the user's to set (docs/ray.md); 2.60 turns
            # the token on by itself for a new local cluster.
            ray.init(num_cpus=cpus, include_dashboard=False)
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def check_resources(ray: Any, options: RayOptions, num_gpus: float, detect: bool,
                    caption_gpus: Optional[float] = None) -> None:
    """caption_gpus: GPUs per caption actor (None: no caption stage)."""
    have = ray.cluster_resources()
    caption = caption_gpus is not None
    cpus = needed_cpus(options, detect, caption)
    if have.get("CPU", 0) < cpus:
        captions = f"caption {options.caption_actors} x {options.caption_cpus:g}, " if caption else ""
        raise InputError(
            f"the stages ask for {cpus:g} CPUs (detect {options.detect_actors} x {options.detect_cpus:g}, "
            f"{captions}tag {options.tag_actors} x {options.tag_cpus:g}, I/O tasks 1) but the cluster "
            f"has {have.get('CPU', 0):g}: use fewer actors or smaller --*-cpus")
    if caption and (caption_gpus or 0) * options.caption_actors + (num_gpus * options.detect_actors if detect else 0) \
            > have.get("GPU", 0):
        raise InputError(f"{options.caption_actors} caption actors x {caption_gpus:g} GPUs and the detect actors' "
                         f"ask for more GPUs than the cluster's {have.get('GPU', 0):g}: lower --caption-gpus "
                         "or --num-gpus (fractions share a GPU)")
    gpus = num_gpus * options.detect_actors if detect else 0
    if gpus > have.get("GPU", 0):
        raise InputError(f"{options.detect_actors} detect actors x {num_gpus:g} GPUs = {gpus:g} GPUs, "
                         f"the cluster has {have.get('GPU', 0):g}: lower --num-gpus or --detect-actors")
    if detect:
        for name, amount in options.detect_resources.items():
            if amount * options.detect_actors > have.get(name, 0):
                raise InputError(f"{options.detect_actors} detect actors x {amount:g} {name!r} = "
                                 f"{amount * options.detect_actors:g}, the cluster has {have.get(name, 0):g}")


# -- stage functions (module level: Ray pickles them by reference) --------------------------


def _stage_table(batch: core.Batch, names: Sequence[str]) -> Any:
    return core.to_table(batch, core.stage_schema(tuple(names) + PLACE_COLUMNS))


def read_part_batch(table: Any, source: Dict[str, Any], loader: Optional[Dict[str, Any]] = None) -> Any:
    """Parts (``part``, ``segments``) -> their parsed posts, each with its place, and,
    given image rules (``loader``), each post's image bytes and sha256.

    One task per part and one block per part from here on (reading and loading in
    one stage: Ray bundles the small part descriptors of a separate read stage up
    to the next stage's batch size, and a bundle's rows come back together), so
    parts come back, and are written, one by one."""
    from .posts import PostColumns

    src = Input(tuple(source["files"]), source["fmt"], PostColumns(**source["columns"]))
    out: core.Batch = {name: [] for name in core.POST_COLUMNS + PLACE_COLUMNS}
    for part, segments in zip(table["part"].to_pylist(), table["segments"].to_pylist()):
        batch = read_part(src, segments_from_json(segments))
        n = len(batch["id"])
        for name in core.POST_COLUMNS:
            out[name].extend(batch[name])
        out["part"].extend([part] * n)
        out["row"].extend(range(n))
    if loader is None:
        return _stage_table(out, core.POST_COLUMNS)
    from ..detection.images import ImageLoader

    out = core.load_images(out, ImageLoader(**loader))
    return _stage_table(out, core.POST_COLUMNS + ("image_key", "image_bytes"))


def _device(use_gpu: bool) -> str:
    import torch

    return "cuda" if use_gpu and torch.cuda.is_available() else "cpu"


class ObjectsActor:
    """The pipeline's object units, loaded once: the features dataset and the store
    are read first, the detector (if configured) runs on the misses only."""

    def __init__(self, reads: PipelineReads, features: Optional[str], use_gpu: bool):
        self.units = load_object_units(reads, features=features, shared=True, device=_device(use_gpu))
        self.units.max_warnings = 0  # failures are rows, not warnings

    def __call__(self, table: Any) -> Any:
        batch = table.to_pydict()
        try:
            out = core.detect(batch, self.units)
        except Exception as err:  # the whole batch failed: each post keeps its text
            out = failed_detection(batch, err)
        caption = ("caption_status",) if "caption_status" in out else ()
        return _stage_table(out, core.POST_COLUMNS + ("image_key",) + core.OBJECT_COLUMNS + caption)


class CaptionActor:
    """The pipeline's image_captioner alone, loaded once: captions the posts that have
    an image and no caption (the features dataset's captions and its caption store
    first, its model on the misses; what it generates is added to the dataset)."""

    def __init__(self, reads: PipelineReads, use_gpu: bool, keep_bytes: bool = True,
                 features: Optional[str] = None):
        self.captioner = load_captioner(reads, device=_device(use_gpu))
        self.captioner.skipped.limit = 0  # failures are rows, not warnings
        attach_captions(self.captioner, features)
        self.keep_bytes = keep_bytes  # for the objects stage after this one

    def __call__(self, table: Any) -> Any:
        out = core.caption(table.to_pydict(), self.captioner)
        kept = ("image_key", "image_bytes") if self.keep_bytes else ("image_key",)
        return _stage_table(out, core.POST_COLUMNS + kept + ("caption_status",))


def failed_detection(batch: core.Batch, err: Exception) -> core.Batch:
    """Every image of the batch failed (e.g. the store cannot be read): error rows.
    A post whose image could not be read (an image error, no key) is failed too,
    as :func:`.core.detect` marks it."""
    n = len(batch["id"])
    keys = batch["image_key"]
    errors = [list(e) + ([core.error(core.DETECTOR, f"{batch['image'][i]}: {err}")] if keys[i] else [])
              for i, e in enumerate(batch["errors"])]
    image_failed = [any(core.error_kind(x).startswith(core.IMAGE_PREFIX) for x in e) for e in batch["errors"]]
    out = {k: v for k, v in batch.items() if k != "image_bytes"}
    out.update(errors=errors, image_status=["failed" if k or bad else "none" for k, bad in zip(keys, image_failed)],
               obj_features=[None] * n, obj_labels=[None] * n, obj_scores=[None] * n, obj_boxes=[None] * n)
    return out


class TagActor:
    """Loads the pipeline once (its object units come from columns); tags each batch."""

    def __init__(self, reads: PipelineReads, batch_size: int):
        self.nlp = load_tagger(reads, objects_from_columns=True, captions_from_columns=True)
        self.batch_size = batch_size

    def __call__(self, table: Any) -> Any:
        batch = table.to_pydict()
        n = len(batch["id"])
        batch.setdefault("image_key", [None] * n)
        batch.setdefault("image_status", ["none"] * n)
        out = core.tag(batch, self.nlp, batch_size=self.batch_size)
        out["part"], out["row"] = batch["part"], batch["row"]
        out["has_image"] = [ref is not None for ref in batch["image"]]
        out["caption_status"] = batch.get("caption_status") or [None] * n
        return core.to_table(out, output_schema_with_place())


def output_schema_with_place() -> Any:
    """The output columns plus each row's place and whether its post named an image
    (for the summary of a pipeline that does not read images); the driver drops them."""
    import pyarrow as pa

    schema = core.output_schema()
    return pa.schema(list(schema) + [pa.field("part", pa.int64()), pa.field("row", pa.int64()),
                                     pa.field("has_image", pa.bool_()), pa.field("caption_status", pa.string())])


# -- tag ----------------------------------------------------------------------------------


def _resolve_gpus(ray: Any, num_gpus: Optional[float]) -> float:
    if num_gpus is not None:
        return float(num_gpus)
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def run_ray(model: str, input_path: str, output: str, columns: core.PostColumns = core.PostColumns(),
            options: Optional[RayOptions] = None, image_root: Optional[str] = None,
            allow_remote: Optional[bool] = None, features: Optional[str] = None, part_size: int = 10000,
            output_format: str = "parquet", resume: bool = True, stages: Optional[Stages] = None,
            unique_ids: bool = False) -> Dict[str, Any]:
    """Tag every post of ``input_path`` on Ray Data into numbered parts under ``output``.

    The driver plans the parts and writes them; the workers read the posts (the
    input must be at the same path on every node: a shared mount), their images,
    features and detections, and tag them. ``features``: a Parquet features
    dataset (path or URI) read before the pipeline's stores; detections and captions
    of images not in it are added to it. Every check (the features dataset, the input, the
    output folder's job) is made before a cluster is joined or started.
    """
    options = options or RayOptions()
    stages = stages or Stages()
    input_path = str(Path(input_path).resolve())
    source = open_input(Path(input_path), columns)
    reads = describe_pipeline(model, image_root, allow_remote, precision=options.precision)
    parts, plan, job = start_job(reads, source, Path(output), part_size, output_format, features, resume, unique_ids)
    done = job.done
    todo = [(k, segs) for k, segs in enumerate(plan) if k not in done]
    objects = reads.reads_objects
    detector = objects and reads.has_detector
    captions = reads.captioner is not None
    counts: Counter = Counter()
    num_gpus = 0.0
    start = time.perf_counter()
    with cluster(options, detect=objects, caption=captions) as ray:
        from ray.data import ActorPoolStrategy

        num_gpus = _resolve_gpus(ray, options.num_gpus) if detector else 0.0
        caption_gpus = _resolve_gpus(ray, options.caption_gpus) if captions else None
        check_resources(ray, options, num_gpus, detect=objects, caption_gpus=caption_gpus)
        start = time.perf_counter()
        if todo:
            items = [{"part": k, "segments": segments_to_json(segs)} for k, segs in todo]
            ds = ray.data.from_items(items, override_num_blocks=len(items))
            src = {"files": list(source.files), "fmt": source.fmt, "columns": asdict(source.columns)}
            loader = reads.loader_kwargs() if reads.reads_images else None
            ds = ds.map_batches(stages.read, fn_kwargs={"source": src, "loader": loader}, batch_format="pyarrow",
                                batch_size=1, num_cpus=options.io_cpus)
            if captions:
                ds = ds.map_batches(stages.caption, fn_constructor_kwargs={"reads": reads, "use_gpu": bool(caption_gpus),
                                                           "keep_bytes": objects, "features": features},
                                    compute=ActorPoolStrategy(size=options.caption_actors), batch_format="pyarrow",
                                    batch_size=options.caption_batch_size, num_cpus=options.caption_cpus,
                                    num_gpus=caption_gpus)
            if objects:
                ds = ds.map_batches(stages.objects,
                                    fn_constructor_kwargs={"reads": reads, "features": features,
                                                           "use_gpu": num_gpus > 0},
                                    compute=ActorPoolStrategy(size=options.detect_actors),
                                    batch_format="pyarrow", batch_size=options.detect_batch_size,
                                    num_cpus=options.detect_cpus, num_gpus=num_gpus,
                                    resources=(options.detect_resources or None) if detector else None)
            ds = ds.map_batches(stages.tag, fn_constructor_kwargs={"reads": reads, "batch_size": options.batch_size},
                                compute=ActorPoolStrategy(size=options.tag_actors), batch_format="pyarrow",
                                batch_size=options.batch_size, num_cpus=options.tag_cpus, num_gpus=0)
            expected = {k: sum(s.count for s in segs) for k, segs in todo}
            collect_parts(ds, expected, parts, counts, reads_images=reads.reads_images)
        seconds = time.perf_counter() - start
    earlier_parts = [k for k in done if k < len(plan)]
    skipped = sum(seg.count for k in earlier_parts for seg in plan[k])  # posts an earlier run wrote
    summary = core.format_summary(counts, seconds, "ray")
    summary += core.resume_note(output, counts["posts"], skipped, len(earlier_parts))
    summary += core.images_not_read_note(counts["images_not_read"])
    summary += job.notes(parts)
    return {"engine": "ray", "posts": counts["posts"], "posts_in_output": skipped + counts["posts"],
            "seconds": seconds, "posts_per_second": counts["posts"] / seconds if seconds > 0 else 0.0,
            "parts": len(plan), "parts_skipped": len(done), "parts_written": len(todo),
            "counts": dict(counts), "num_gpus_per_detect_actor": num_gpus, "summary": summary,
            "parts_redone": sorted(job.redo), "duplicate_ids": job.record["input"].get("duplicate_ids", 0)}


def collect_parts(ds: Any, expected: Dict[int, int], parts: Parts, counts: Counter,
                  reads_images: bool = True) -> None:
    """Gather the output rows by part; write each part (in input order) as soon as
    all its rows are back. Only the parts in flight are held in memory."""
    pending: Dict[int, List[Tuple[int, Dict[str, Any]]]] = {}
    for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in table.to_pylist():
            if row.pop("has_image", False) and not reads_images:
                counts["images_not_read"] += 1
            caption = row.pop("caption_status", None)
            if caption is not None:
                counts[f"caption:{caption}"] += 1
            part = row.pop("part")
            pending.setdefault(part, []).append((row.pop("row"), row))
            if len(pending[part]) == expected[part]:
                rows = [r for _, r in sorted(pending.pop(part), key=lambda item: item[0])]
                batch = {name: [r[name] for r in rows] for name in core.OUTPUT_COLUMNS}
                parts.write(part, batch)
                core.count_rows(batch, counts)
    if pending:  # cannot happen unless a stage drops rows: say so rather than write a short part
        raise RuntimeError(f"parts {sorted(pending)} came back incomplete; rerun to redo them")


# -- detect into a features dataset ------------------------------------------------------------


class DetectFeaturesActor:
    """Detects the images not yet in the features dataset and adds them to it
    (one part file per batch, written by the actor itself)."""

    def __init__(self, detector_args: Dict[str, Any], loader: Dict[str, Any], root: str, use_gpu: bool):
        from ..cli.detect import build_detector
        from ..units.objects import ObjectUnits
        from .features import FeatureDataset

        detector = build_detector(**{**detector_args, "device": _device(use_gpu)})
        self.units = ObjectUnits(detector=detector, top_k=detector.top_k, max_warnings=0,
                                 features=FeatureDataset(root, writable=True), **loader)

    def __call__(self, table: Any) -> Any:
        import pyarrow as pa

        batch = table.to_pydict()
        try:
            out = core.detect(batch, self.units)
        except Exception as err:
            out = failed_detection(batch, err)
        return pa.Table.from_pydict({
            "image": out["image"], "status": out["image_status"],
            "error": ["; ".join(e) or None for e in out["errors"]],
        })


def run_ray_detect(refs: List[str], root_dir: Optional[str], features: str, detector_args: Dict[str, Any],
                   allow_remote: bool = False, options: Optional[RayOptions] = None,
                   progress: bool = True) -> Dict[str, Any]:
    """Fill a Parquet features dataset with the detections of ``refs`` on Ray Data.

    Images already in the dataset (same content, same detector signature) are
    skipped. Each actor adds one part file per batch, so the dataset grows as the
    job runs and a stopped job keeps what it wrote.
    """
    from tqdm import tqdm

    options = options or RayOptions(tag_actors=0)
    options.tag_actors = 0
    loader = {"image_root": str(Path(root_dir).resolve()) if root_dir else None, "allow_remote": allow_remote}
    counts: Counter = Counter()
    failures: List[str] = []
    with cluster(options, detect=True) as ray:
        from ray.data import ActorPoolStrategy

        num_gpus = _resolve_gpus(ray, options.num_gpus)
        check_resources(ray, options, num_gpus, detect=True)
        start = time.perf_counter()
        items = [{"id": ref, "text": "", "image": ref, "caption": None, "errors": []} for ref in refs]
        ds = ray.data.from_items(items)
        ds = ds.map_batches(load_images_batch, fn_kwargs={"loader": loader}, batch_format="pyarrow",
                            batch_size=options.detect_batch_size, num_cpus=options.io_cpus)
        ds = ds.map_batches(DetectFeaturesActor,
                            fn_constructor_kwargs={"detector_args": detector_args, "loader": loader,
                                                   "root": features, "use_gpu": num_gpus > 0},
                            compute=ActorPoolStrategy(size=options.detect_actors), batch_format="pyarrow",
                            batch_size=options.detect_batch_size, num_cpus=options.detect_cpus,
                            num_gpus=num_gpus, resources=options.detect_resources or None)
        with tqdm(total=len(refs), unit="img", desc="detect", disable=not progress) as bar:
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                rows = batch.to_pydict()
                for image, status, err in zip(rows["image"], rows["status"], rows["error"]):
                    counts[status] += 1
                    if status == "failed" or err:
                        failures.append(err or image)
                bar.update(len(rows["status"]))
        seconds = time.perf_counter() - start
    return {"images": len(refs), "detected": counts["detected"], "cached": counts["cached"],
            "failed": len(failures), "seconds": seconds,
            "images_per_second": counts["detected"] / seconds if seconds > 0 else 0.0,
            "failures": failures, "num_gpus_per_detect_actor": num_gpus}


def load_images_batch(table: Any, loader: Dict[str, Any]) -> Any:
    """Image references -> their bytes and sha256 (``detect --engine ray``)."""
    from ..detection.images import ImageLoader

    batch = core.load_images(table.to_pydict(), ImageLoader(**loader))
    return core.to_table(batch, core.stage_schema(core.POST_COLUMNS + ("image_key", "image_bytes")))


def as_uri(path: Any) -> str:
    """A path argument as given: ``Path("s3://b/k")`` reads ``s3:/b/k``; put the slash back."""
    import re

    text = str(path)
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*):/(?!/)", r"\1://", text) if not Path(text).exists() else text
