"""``tag --engine ray`` and ``detect --engine ray``: the same steps on Ray Data.

    read posts -> parse (tasks) -> image bytes + sha256 (tasks)
      -> detect (actor pool: the detector loaded once per actor, GPUs if asked)
      -> tag (CPU actor pool: the pipeline loaded once per actor, objects as columns)
      -> write Parquet

Every stage runs a function of :mod:`.core` on plain Arrow columns: no
``Language`` or ``Doc`` crosses a process. Every actor pool states its
``num_cpus`` and ``num_gpus`` (a GPU actor that states no CPUs takes a whole
one, and on a small machine the other stages then wait forever); the task
stages state ``num_cpus`` and take no GPU (Ray's default for tasks, left
implicit because Ray warns on tasks that state both). Before running, the stages' needs are checked against the
cluster, so a job that cannot be scheduled fails with a message instead of
waiting forever. A post whose image, caption or pipeline call fails becomes a
row with an ``error``; an actor that dies is restarted by Ray and its batch
run again.

Ray is imported inside the functions: the package works without it.
"""
import json
import os
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from . import core
from .models import load_object_units, load_tagger, object_units_block, unit_overrides
from .posts import InputError, JSONL_SUFFIXES, PARQUET_SUFFIXES

#: Test hook: a path; the first tag actor call that can create it exits the process.
CRASH_ONCE_ENV = "SPACY_AGBAN_BATCH_CRASH_ONCE"
#: Benchmark hook: a folder; every stage call appends its rows and seconds there.
TIMINGS_ENV = "SPACY_AGBAN_BATCH_TIMINGS"
JSONL_EXTENSIONS = [s.lstrip(".") for s in JSONL_SUFFIXES]
PARQUET_EXTENSIONS = [s.lstrip(".") for s in PARQUET_SUFFIXES]


@dataclass
class RayOptions:
    """How the job is spread. ``num_gpus``: per detect actor (fractions share a GPU;
    None: 1 if the cluster has a GPU, else 0)."""

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


def needed_cpus(options: RayOptions, detect: bool = True) -> float:
    actors = options.tag_actors * options.tag_cpus
    if detect:
        actors += options.detect_actors * options.detect_cpus
    return actors + max(1.0, options.io_cpus)  # plus room for the read/parse/load/write tasks


@contextmanager
def cluster(options: RayOptions, detect: bool = True) -> Iterator[Any]:
    """Join ``options.address``, use the cluster already started in this process,
    or start a local one bound to 127.0.0.1 without a dashboard (shut down after)."""
    import ray

    started = False
    if not ray.is_initialized():
        if options.address:
            ray.init(address=options.address)
        else:
            import math

            cpus = options.num_cpus or max(os.cpu_count() or 1, math.ceil(needed_cpus(options, detect)))
            with small_machine_settings():
                ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1")
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


#: Read by a local cluster's raylet when it starts. Ray runs workers at nice 15
#: and gives a starting worker 60 s to register: on a small machine busy with
#: other work, such workers starve, time out, are started again and time out
#: again, and the job waits forever. Normal priority and a longer wait fix it.
SMALL_MACHINE_ENV = {"RAY_worker_niceness": "0", "RAY_worker_register_timeout_seconds": "600"}


@contextmanager
def small_machine_settings() -> Iterator[None]:
    """Set :data:`SMALL_MACHINE_ENV` (unless already set) while a local cluster starts."""
    saved = {k: os.environ.get(k) for k in SMALL_MACHINE_ENV}
    for key, value in SMALL_MACHINE_ENV.items():
        os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_resources(ray: Any, options: RayOptions, num_gpus: float, detect: bool) -> None:
    have = ray.cluster_resources()
    cpus = needed_cpus(options, detect)
    if have.get("CPU", 0) < cpus:
        raise InputError(
            f"the stages ask for {cpus:g} CPUs (detect {options.detect_actors} x {options.detect_cpus:g}, "
            f"tag {options.tag_actors} x {options.tag_cpus:g}, I/O tasks 1) but the cluster "
            f"has {have.get('CPU', 0):g}: use fewer actors or smaller --*-cpus")
    gpus = num_gpus * options.detect_actors if detect else 0
    if gpus > have.get("GPU", 0):
        raise InputError(f"{options.detect_actors} detect actors x {num_gpus:g} GPUs = {gpus:g} GPUs, "
                         f"the cluster has {have.get('GPU', 0):g}: lower --num-gpus or --detect-actors")


def _crash_once_for_tests() -> None:
    marker = os.environ.get(CRASH_ONCE_ENV)
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(1)


def record_timing(stage: str, rows: int, seconds: float, images: int = 0) -> None:
    folder = os.environ.get(TIMINGS_ENV)
    if not folder:
        return
    line = json.dumps({"stage": stage, "rows": rows, "images": images, "seconds": seconds, "pid": os.getpid()})
    with open(os.path.join(folder, f"{stage}-{os.getpid()}.jsonl"), "a") as handle:
        handle.write(line + "\n")


# -- stage functions (module level: Ray pickles them by reference) --------------------------


def parse_jsonl_batch(table: Any, columns: Dict[str, Optional[str]]) -> Any:
    lines = table["text"].to_pylist()
    paths = table["path"].to_pylist() if "path" in table.column_names else [""] * len(lines)
    kept = [i for i, line in enumerate(lines) if line.strip()]  # blank lines are no posts (as locally)
    lines, paths = [lines[i] for i in kept], [paths[i] for i in kept]
    wheres = [f"{Path(p).name}:{core.short_hash(line)}" for p, line in zip(paths, lines)]
    batch = core.parse_lines(lines, wheres, core.PostColumns(**columns))
    return core.to_table(batch, core.stage_schema(core.POST_COLUMNS))


def parse_parquet_batch(table: Any, columns: Dict[str, Optional[str]]) -> Any:
    paths = table["path"].to_pylist() if "path" in table.column_names else [""] * table.num_rows
    records = table.drop_columns([c for c in ("path",) if c in table.column_names]).to_pylist()
    wheres = [f"{Path(p).name}:{core.short_hash(json.dumps(r, default=str, sort_keys=True))}"
              for p, r in zip(paths, records)]
    batch = core.parse_records(records, wheres, core.PostColumns(**columns))
    return core.to_table(batch, core.stage_schema(core.POST_COLUMNS))


def load_images_batch(table: Any, loader: Dict[str, Any]) -> Any:
    from ..detection.images import ImageLoader

    start = time.perf_counter()
    batch = core.load_images(table.to_pydict(), ImageLoader(**loader))
    record_timing("load", table.num_rows, time.perf_counter() - start,
                  sum(k is not None for k in batch["image_key"]))
    return core.to_table(batch, core.stage_schema(core.POST_COLUMNS + ("image_key", "image_bytes")))


def _device(use_gpu: bool) -> str:
    import torch

    return "cuda" if use_gpu and torch.cuda.is_available() else "cpu"


class DetectActor:
    """Loads the pipeline's detector once; detects the images of each batch."""

    def __init__(self, model: str, changes: Dict[str, Any], use_gpu: bool):
        start = time.perf_counter()
        changes = {**changes, "detector.device": _device(use_gpu)}
        self.units = load_object_units(model, changes, keep_store=False)
        self.units.max_warnings = 0  # failures are rows, not warnings
        record_timing("detect_init", 0, time.perf_counter() - start)

    def __call__(self, table: Any) -> Any:
        start = time.perf_counter()
        batch = table.to_pydict()
        try:
            out = core.detect(batch, self.units)
        except Exception as err:  # the whole batch failed: each post keeps its text
            out = _failed_detection(batch, err)
        record_timing("detect", table.num_rows, time.perf_counter() - start,
                      sum(s == "detected" for s in out["image_status"]))
        return core.to_table(out, core.stage_schema(core.POST_COLUMNS + ("image_key",) + core.OBJECT_COLUMNS))


def _failed_detection(batch: core.Batch, err: Exception) -> core.Batch:
    n = len(batch["id"])
    keys = batch["image_key"]
    errors = [list(e) + ([core.error(core.DETECTOR, f"{batch['image'][i]}: {err}")] if keys[i] else [])
              for i, e in enumerate(batch["errors"])]
    out = {k: v for k, v in batch.items() if k != "image_bytes"}
    out.update(errors=errors, image_status=["failed" if k else "none" for k in keys],
               obj_features=[None] * n, obj_labels=[None] * n, obj_scores=[None] * n, obj_boxes=[None] * n)
    return out


class TagActor:
    """Loads the pipeline once (its object units come from columns); tags each batch."""

    def __init__(self, model: str, batch_size: int):
        start = time.perf_counter()
        self.nlp = load_tagger(model, objects_from_columns=True)
        self.batch_size = batch_size
        record_timing("tag_init", 0, time.perf_counter() - start)

    def __call__(self, table: Any) -> Any:
        _crash_once_for_tests()
        start = time.perf_counter()
        batch = table.to_pydict()
        n = len(batch["id"])
        batch.setdefault("image_key", [None] * n)
        batch.setdefault("image_status", ["none"] * n)
        out = core.to_table(core.tag(batch, self.nlp, batch_size=self.batch_size), core.output_schema())
        record_timing("tag", n, time.perf_counter() - start)
        return out


# -- reading -------------------------------------------------------------------------------


def _is_uri(path: str) -> bool:
    return "://" in path


def as_uri(path: Any) -> str:
    """A path argument as given: ``Path("s3://b/k")`` reads ``s3:/b/k``; put the slash back."""
    import re

    text = str(path)
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*):/(?!/)", r"\1://", text) if not Path(text).exists() else text


def input_format(paths: Sequence[str], fmt: str = "auto") -> str:
    if fmt in ("jsonl", "parquet"):
        return fmt
    suffixes = set()
    for path in paths:
        if not _is_uri(path) and Path(path).is_dir():
            suffixes.update(p.suffix.lower() for p in Path(path).iterdir() if p.is_file())
        else:
            suffixes.add(Path(path.rstrip("/")).suffix.lower())
    if suffixes & set(PARQUET_SUFFIXES) and not suffixes & set(JSONL_SUFFIXES):
        return "parquet"
    if suffixes & set(JSONL_SUFFIXES) and not suffixes & set(PARQUET_SUFFIXES):
        return "jsonl"
    raise InputError(f"cannot tell whether {list(paths)} is JSONL or Parquet: pass --input-format")


def read_posts(ray: Any, paths: Sequence[str], columns: core.PostColumns, options: RayOptions,
               fmt: str = "auto", block_rows: int = 64) -> Any:
    """A dataset of parsed posts (``core.POST_COLUMNS``) from local paths or URIs."""
    fmt = input_format(paths, fmt)
    paths = [p if _is_uri(p) else str(Path(p).resolve()) for p in paths]
    if fmt == "jsonl":
        ds = ray.data.read_text(paths, include_paths=True, file_extensions=JSONL_EXTENSIONS,
                                num_cpus=options.io_cpus)
        fn = parse_jsonl_batch
    else:
        ds = ray.data.read_parquet(paths, include_paths=True, file_extensions=PARQUET_EXTENSIONS,
                                   num_cpus=options.io_cpus)
        names = set(ds.schema().names)
        for field in (columns.id, columns.text):
            if field not in names:
                raise InputError(f"the Parquet input has no column {field!r} (columns: {sorted(names)})")
        columns = core.PostColumns(columns.id, columns.text,
                                   columns.image if columns.image in names else None,
                                   columns.caption if columns.caption in names else None)
        fn = parse_parquet_batch
    # The parsed blocks are what the next stages hand out: blocks of a detect batch
    # each, so that every detect actor gets work (one block goes to one actor).
    return ds.map_batches(fn, fn_kwargs={"columns": asdict(columns)}, batch_format="pyarrow",
                          batch_size=block_rows, num_cpus=options.io_cpus)


def _loader_kwargs(model: str, changes: Dict[str, Any]) -> Dict[str, Any]:
    _, block = object_units_block(model)
    block = {**(block or {}), **{k: v for k, v in changes.items() if "." not in k}}
    root = block.get("image_root")
    return {"image_root": str(Path(root).resolve()) if root and not _is_uri(str(root)) else root,
            "allow_remote": bool(block.get("allow_remote", False)),
            "max_pixels": int(block.get("max_pixels", 64_000_000))}


def _resolve_gpus(ray: Any, num_gpus: Optional[float]) -> float:
    if num_gpus is not None:
        return float(num_gpus)
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def _worker_env(*names: str) -> Dict[str, Any]:
    """The test and benchmark hooks set in this process, passed on to a stage's workers
    (only where set: a runtime env of its own makes Ray start separate workers)."""
    env = {k: os.environ[k] for k in names if os.environ.get(k)}
    return {"runtime_env": {"env_vars": env}} if env else {}


# -- tag ----------------------------------------------------------------------------------


def run_ray(model: str, inputs: Sequence[str], output: str, columns: core.PostColumns = core.PostColumns(),
            options: Optional[RayOptions] = None, image_root: Optional[str] = None,
            allow_remote: Optional[bool] = None, input_format_name: str = "auto") -> Dict[str, Any]:
    """Tag every post of ``inputs`` on Ray Data into Parquet files under ``output``."""
    options = options or RayOptions()
    model = str(Path(model).resolve())
    out_path = output if _is_uri(output) else str(Path(output).resolve())
    if not _is_uri(output) and Path(output).exists() and any(Path(output).iterdir()):
        raise InputError(f"output folder {output} is not empty: use a new one")
    _, block = object_units_block(model)
    changes = unit_overrides(block, image_root, allow_remote)
    objects = block is not None
    with cluster(options, detect=objects) as ray:
        from ray.data import ActorPoolStrategy

        num_gpus = _resolve_gpus(ray, options.num_gpus) if objects else 0.0
        check_resources(ray, options, num_gpus, detect=objects)
        start = time.perf_counter()
        block_rows = options.detect_batch_size if objects else options.batch_size
        ds = read_posts(ray, inputs, columns, options, input_format_name, block_rows)
        if objects:
            ds = ds.map_batches(load_images_batch, fn_kwargs={"loader": _loader_kwargs(model, changes)},
                                batch_format="pyarrow", batch_size=options.detect_batch_size,
                                num_cpus=options.io_cpus, **_worker_env(TIMINGS_ENV))
            ds = ds.map_batches(DetectActor, fn_constructor_kwargs={"model": model, "changes": changes,
                                                                    "use_gpu": num_gpus > 0},
                                compute=ActorPoolStrategy(size=options.detect_actors),
                                batch_format="pyarrow", batch_size=options.detect_batch_size,
                                num_cpus=options.detect_cpus, num_gpus=num_gpus, **_worker_env(TIMINGS_ENV))
        ds = ds.map_batches(TagActor, fn_constructor_kwargs={"model": model, "batch_size": options.batch_size},
                            compute=ActorPoolStrategy(size=options.tag_actors), batch_format="pyarrow",
                            batch_size=options.batch_size, num_cpus=options.tag_cpus, num_gpus=0,
                            **_worker_env(CRASH_ONCE_ENV, TIMINGS_ENV))
        ds.write_parquet(out_path, ray_remote_args={"num_cpus": options.io_cpus})
        seconds = time.perf_counter() - start
    counts = summarize_output(out_path)
    return {"engine": "ray", "posts": counts["posts"], "seconds": seconds,
            "posts_per_second": counts["posts"] / seconds if seconds > 0 else 0.0,
            "counts": dict(counts), "num_gpus_per_detect_actor": num_gpus,
            "summary": core.format_summary(counts, seconds, "ray")}


def summarize_output(path: str) -> Counter:
    """Counts over a finished job's Parquet files (two small columns read)."""
    import pyarrow.dataset as pds

    table = pds.dataset(path, format="parquet").to_table(columns=["id", "error_kinds", "image_status"])
    return core.count_rows(table.to_pydict())


# -- detect into a features dataset ------------------------------------------------------------


class DetectFeaturesActor:
    """Detects images not yet in the features dataset; returns keys, status and features."""

    def __init__(self, detector_args: Dict[str, Any], loader: Dict[str, Any], root: str, use_gpu: bool):
        from ..detection.cli import build_detector
        from ..detection.object_units import ObjectUnits
        from .features import FeatureDataset

        detector = build_detector(**{**detector_args, "device": _device(use_gpu)})
        self.units = ObjectUnits(detector=detector, top_k=detector.top_k, max_warnings=0, **loader)
        self.sig = self.units.signature
        self.description = json.dumps(detector.signature(), sort_keys=True)
        self.known = FeatureDataset(root).keys(self.sig)

    def __call__(self, table: Any) -> Any:
        import pyarrow as pa

        batch = table.to_pydict()
        known = [k is not None and k in self.known for k in batch["image_key"]]
        todo = {k: [v for v, skip in zip(col, known) if not skip] for k, col in batch.items()}
        try:
            out = core.detect(todo, self.units)
        except Exception as err:
            out = _failed_detection(todo, err)
        n_known = sum(known)
        return pa.Table.from_pydict({
            "image": out["image"] + [r for r, skip in zip(batch["image"], known) if skip],
            "image_key": out["image_key"] + [k for k, skip in zip(batch["image_key"], known) if skip],
            "status": out["image_status"] + ["cached"] * n_known,
            "error": ["; ".join(e) or None for e in out["errors"]] + [None] * n_known,
            "features": out["obj_features"] + [None] * n_known,
            "labels": out["obj_labels"] + [None] * n_known,
            "scores": out["obj_scores"] + [None] * n_known,
            "boxes": out["obj_boxes"] + [None] * n_known,
            "sig": [self.sig] * len(batch["image"]),
            "sig_description": [self.description] * len(batch["image"]),
        })


def run_ray_detect(refs: List[str], root_dir: Optional[str], features: str, detector_args: Dict[str, Any],
                   allow_remote: bool = False, options: Optional[RayOptions] = None,
                   progress: bool = True) -> Dict[str, Any]:
    """Fill a Parquet features dataset with the detections of ``refs`` on Ray Data.

    Images already in the dataset (same content, same detector signature) are
    skipped. The driver writes one part file per batch it receives, so the
    dataset grows as the job runs and a stopped job keeps what it wrote.
    """
    from tqdm import tqdm

    from .features import FeatureDataset

    options = options or RayOptions(tag_actors=0)
    options.tag_actors = 0
    loader = {"image_root": str(Path(root_dir).resolve()) if root_dir else None, "allow_remote": allow_remote}
    dataset = FeatureDataset(features)
    counts: Counter = Counter()
    failures: List[str] = []
    written: set = set()
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
                            num_gpus=num_gpus)
        with tqdm(total=len(refs), unit="img", desc="detect", disable=not progress) as bar:
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                rows = batch.to_pydict()
                entries = []
                for i, status in enumerate(rows["status"]):
                    counts[status] += 1
                    key = rows["image_key"][i]
                    if status == "detected" and key not in written:
                        written.add(key)
                        entries.append((key, core.row_to_detections(
                            rows["features"][i], rows["labels"][i], rows["scores"][i], rows["boxes"][i])))
                    elif status == "failed" or rows["error"][i]:
                        failures.append(rows["error"][i] or rows["image"][i])
                if rows["sig"]:
                    dataset.register_signature(rows["sig"][0], json.loads(rows["sig_description"][0]))
                    dataset.write(entries, rows["sig"][0])
                bar.update(len(rows["status"]))
        seconds = time.perf_counter() - start
    return {"images": len(refs), "detected": counts["detected"], "cached": counts["cached"],
            "failed": len(failures), "seconds": seconds,
            "images_per_second": counts["detected"] / seconds if seconds > 0 else 0.0,
            "failures": failures, "num_gpus_per_detect_actor": num_gpus}
