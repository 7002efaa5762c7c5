"""``python -m spacy_agban tag``, ``detect`` (both engines) and ``features export|import``."""
import contextlib
import functools
import inspect
import json
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import typer

from .detect import checked_sources
from .detect import detect_command as detect_local

from ..tagging.core import PostColumns
from ..tagging.posts import InputError, check_parquet_columns, count_posts, input_files

ENGINES = ("local", "ray")
OUTPUT_FORMATS = ("parquet", "jsonl")


def tag_command(
    model: Path = typer.Argument(..., help="A trained pipeline folder (with an agban component)"),
    input_path: str = typer.Argument(..., metavar="INPUT",
                                     help="Posts: a .jsonl or .parquet file or a folder of them (ray: also s3://, gs://, ...)"),
    output: str = typer.Argument(..., help="Output folder of Parquet (or JSONL) parts"),
    engine: str = typer.Option("local", "--engine", help="local (one process) or ray (Ray Data)"),
    id_key: str = typer.Option("id", "--id-key", help="Field/column of the post id"),
    text_key: str = typer.Option("text", "--text-key", help="Field/column of the post text"),
    image_key: str = typer.Option("image", "--image-key", help="Field/column of the image path or URI"),
    caption_key: str = typer.Option("caption", "--caption-key", help="Field/column of the caption (alt text)"),
    batch_size: int = typer.Option(64, "--batch-size", help="Posts per nlp.pipe batch"),
    image_root: Optional[str] = typer.Option(None, "--image-root", help="Folder relative image paths resolve against (default: the pipeline's)"),
    allow_remote: Optional[bool] = typer.Option(None, "--allow-remote/--no-remote", help="Fetch http(s) and object-store images (default: the pipeline's setting)"),
    features: Optional[str] = typer.Option(None, "--features", help="A Parquet features dataset (folder or URI) read before the pipeline's stores: object features and captions; new detections and generated captions are added to it"),
    part_size: int = typer.Option(10000, "--part-size", help="Posts per output part (the resume unit)"),
    output_format: str = typer.Option("parquet", "--output-format", help="parquet or jsonl"),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Go on after the parts already written"),
    gpu_id: int = typer.Option(-1, "--gpu-id", help="local: run the detector (and spaCy, where cupy is installed) on this GPU"),
    address: Optional[str] = typer.Option(None, "--address", help="ray: join this cluster (default: start a local one for this job)"),
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", help="ray: CPUs of the local cluster (default: enough for the stages)"),
    num_gpus: Optional[float] = typer.Option(None, "--num-gpus", help="ray: GPUs per detect actor, fractions allowed (default: 1 if the cluster has a GPU, else 0)"),
    detect_actors: int = typer.Option(1, "--detect-actors", help="ray: detector actors"),
    tag_actors: int = typer.Option(1, "--tag-actors", help="ray: tagging actors (CPU)"),
    detect_cpus: float = typer.Option(1.0, "--detect-cpus", help="ray: CPUs per detect actor"),
    tag_cpus: float = typer.Option(1.0, "--tag-cpus", help="ray: CPUs per tag actor"),
    detect_batch_size: int = typer.Option(16, "--detect-batch-size", help="ray: images per detect batch"),
    detect_resource: Optional[List[str]] = typer.Option(None, "--detect-resource", help="ray: NAME=AMOUNT, a custom resource each detect actor needs (pins detection to the nodes that have it); repeatable"),
    allow_empty: bool = typer.Option(False, "--allow-empty", help="An input without posts is not an error"),
    precision: str = typer.Option("fp32", "--precision", help="The transformer's inference precision or runtime: fp32, bf16, int8, onnx or onnx-int8 (docs/profile.md)"),
    unique_ids: bool = typer.Option(False, "--unique-ids", help="Refuse an input in which posts share an id (by default: a warning with the count)"),
    caption_actors: int = typer.Option(1, "--caption-actors", help="ray: captioner actors (a pipeline with an image_captioner)"),
    caption_cpus: float = typer.Option(1.0, "--caption-cpus", help="ray: CPUs per caption actor"),
    caption_gpus: Optional[float] = typer.Option(None, "--caption-gpus", help="ray: GPUs per caption actor, fractions allowed (default: 1 if the cluster has a GPU, else 0)"),
) -> dict:
    """Tag posts in bulk: entities, visual units used and errors, one row per post."""
    columns = PostColumns(id=id_key, text=text_key, image=image_key or None, caption=caption_key or None)
    try:
        resources = parse_resources(detect_resource or [])
    except ValueError as err:
        typer.echo(f"tag: {err}", err=True)
        raise typer.Exit(1)
    problem = tag_argument_problem(
        model, engine, output_format, id_key, text_key,
        {"--batch-size": batch_size, "--part-size": part_size, "--detect-actors": detect_actors,
         "--tag-actors": tag_actors, "--detect-batch-size": detect_batch_size, "--caption-actors": caption_actors},
        {"--detect-cpus": detect_cpus, "--tag-cpus": tag_cpus, "--caption-cpus": caption_cpus},
    ) or precision_problem(precision, model) or input_problem(input_path, columns, allow_empty)
    if problem:
        typer.echo(f"tag: {problem}", err=True)
        raise typer.Exit(1)
    if image_root is not None and "://" not in image_root:
        # Resolved here, against the folder the command runs in, as the user meant it.
        image_root = str(Path(image_root).resolve())
    try:
        if engine == "local":
            from ..tagging.local import run_local

            with one_line_warnings(), no_record_left_on_failure(output):
                result = run_local(str(model), Path(input_path), Path(output), columns, part_size=part_size,
                                   batch_size=batch_size, output_format=output_format, gpu_id=gpu_id,
                                   image_root=image_root, allow_remote=allow_remote, resume=resume,
                                   features=features, precision=precision, unique_ids=unique_ids)
        else:
            try:
                import ray  # noqa: F401
            except ImportError:
                typer.echo("tag --engine ray needs Ray: pip install 'spacy-agban[ray]'", err=True)
                raise typer.Exit(1)
            from ..tagging.ray_engine import RayOptions, run_ray

            options = RayOptions(address=address, num_cpus=num_cpus, num_gpus=num_gpus,
                                 detect_actors=detect_actors, tag_actors=tag_actors, detect_cpus=detect_cpus,
                                 tag_cpus=tag_cpus, batch_size=batch_size, detect_batch_size=detect_batch_size,
                                 detect_resources=resources, precision=precision, caption_actors=caption_actors,
                                 caption_cpus=caption_cpus, caption_gpus=caption_gpus)
            with one_line_warnings(), no_record_left_on_failure(output):
                result = run_ray(str(model), input_path, output, columns, options, image_root=image_root,
                                 allow_remote=allow_remote, features=features, part_size=part_size,
                                 output_format=output_format, resume=resume, unique_ids=unique_ids)
    except InputError as err:
        typer.echo(f"tag: {err}", err=True)
        raise typer.Exit(1)
    except Exception as err:
        if not _is_arrow_error(err):
            raise
        typer.echo(f"tag: cannot read the input {input_path}: {one_line(err)}", err=True)
        raise typer.Exit(1)
    typer.echo(result["summary"])
    return result


@contextlib.contextmanager
def no_record_left_on_failure(output: str) -> Iterator[None]:
    """A job that fails before its first part (the pipeline does not load: weights not
    downloaded) leaves no job record it wrote, so that the corrected command starts afresh
    rather than meeting a record of a job that never ran."""
    from ..tagging.posts import JOB_FILE

    folder = Path(output)
    record = folder / JOB_FILE
    existed, folder_existed = record.exists(), folder.exists()
    try:
        yield
    except BaseException:
        if not existed and record.is_file() and not any(p.name.startswith("part-") for p in folder.iterdir()):
            record.unlink()
            if not folder_existed and not any(folder.iterdir()):
                folder.rmdir()
        raise


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Show the job's own warnings (repeated ids) as ``tag: warning: ...`` lines, when
    they happen, rather than with Python's file and line."""
    from ..tagging.job import DuplicateIdsWarning

    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
            if issubclass(category, DuplicateIdsWarning):
                typer.echo(f"tag: warning: {message}", err=True)
            else:
                shown(message, category, *args, **kwargs)

        warnings.showwarning = show
        warnings.simplefilter("always", DuplicateIdsWarning)
        yield


def precision_problem(precision: str, model: Path) -> Optional[str]:
    """What is wrong with ``--precision`` for this saved pipeline (None if nothing),
    read from its config before any worker loads it."""
    from spacy.util import load_config

    from ..inference.precision import PRECISIONS

    if precision not in PRECISIONS:
        return f"--precision takes {', '.join(PRECISIONS)}, got {precision!r}"
    if precision == "fp32":
        return None
    if precision.startswith("onnx"):
        import importlib.util

        if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
            return (f"--precision {precision} needs the onnxruntime and onnx packages: "
                    "pip install 'spacy-agban[onnx]'")
    try:
        components = load_config(Path(model) / "config.cfg", interpolate=False).get("components", {})
    except Exception:  # an unreadable config: spacy.load says why, later
        return None
    if not any(block.get("factory") == "transformer" for block in components.values()):
        return (f"--precision {precision} converts a transformer component, and {model} has none "
                "(its components: " + ", ".join(components) + "); leave --precision at fp32")
    return None


def parse_resources(specs: List[str]) -> Dict[str, float]:
    """``["detect_node=1", "x"]`` -> ``{"detect_node": 1.0, "x": 1.0}``."""
    out: Dict[str, float] = {}
    for spec in specs:
        name, _, amount = spec.partition("=")
        try:
            out[name.strip()] = float(amount) if amount else 1.0
        except ValueError:
            raise ValueError(f"--detect-resource {spec!r}: expected NAME=AMOUNT, e.g. detect_node=1") from None
        if not name.strip() or not out[name.strip()] > 0:
            raise ValueError(f"--detect-resource {spec!r}: expected NAME=AMOUNT with AMOUNT > 0")
    return out


@functools.wraps(detect_local)
def detect_command(*args: Any, **kwargs: Any) -> Dict[str, Any]:
    """Detect objects once and store their features: ``--engine local`` into the
    SQLite store (:mod:`spacy_agban.cli.detect`), ``--engine ray`` into a Parquet
    features dataset on a Ray cluster (here, so that detection/ never imports batch/)."""
    bound = inspect.signature(detect_local).bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    if a["engine"] != "ray":
        return detect_local(*args, **kwargs)
    from ..tagging.ray_engine import RayOptions, as_uri, run_ray_detect

    refs, root, why_not = checked_sources(a["source"], a["image_root"], a["store"], a["detector"], a["engine"],
                                          a["min_size"], a["max_size"], a["top_k"], a["batch_size"], a["limit"],
                                          a["actors"])
    if refs is None:
        return {"images": 0, "reason": why_not}
    args_ = {k: a[k] for k in ("detector", "weights", "min_size", "max_size", "top_k", "batch_size", "score_threshold")}
    summary = run_ray_detect(refs, str(root) if root else None, as_uri(a["store"]), args_, a["allow_remote"],
                             RayOptions(address=a["address"], num_gpus=a["num_gpus"], detect_actors=a["actors"],
                                        detect_batch_size=max(a["batch_size"], 16)))
    typer.echo(f"detect (ray): {summary['images']} images: {summary['detected']} detected, "
               f"{summary['cached']} already in {a['store']}, {summary['failed']} failed; "
               f"{summary['images_per_second']:.2f} images/s, {summary['seconds']:.1f} s in all.")
    return summary


def tag_argument_problem(model: Path, engine: str, output_format: str, id_key: str,
                         text_key: str, counts: Dict[str, int], amounts: Dict[str, float]) -> Optional[str]:
    """What is wrong with the arguments of ``tag`` (None if nothing), before anything runs."""
    if engine not in ENGINES:
        return f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}"
    if output_format not in OUTPUT_FORMATS:
        return f"--output-format must be one of {', '.join(OUTPUT_FORMATS)}, not {output_format!r}"
    for option, value in counts.items():
        if value < 1:
            return f"{option} must be at least 1, not {value}"
    for option, amount in amounts.items():
        if not amount > 0:
            return f"{option} must be more than 0, not {amount}"
    if not id_key or not text_key:
        return "--id-key and --text-key must name a field"
    if not (model / "config.cfg").is_file():
        return f"{model} is not a saved pipeline (no config.cfg): pass the folder spacy train or nlp.to_disk wrote"
    return None


def input_problem(input_path: str, columns: PostColumns, allow_empty: bool) -> Optional[str]:
    """A local input that does not exist, cannot be read, lacks the id or text column,
    or holds no post (unless ``allow_empty``). Remote inputs (URIs) are checked by the
    Ray engine when it reads them."""
    if "://" in input_path:
        return None
    fmt = "posts"
    try:
        files, fmt = input_files(Path(input_path))
        n = count_posts(files, fmt)
        if fmt == "parquet":
            check_parquet_columns(files, columns)
    except InputError as err:
        return str(err)
    except OSError as err:
        return f"cannot read {input_path}: {one_line(err)}"
    except Exception as err:
        if not _is_arrow_error(err):
            raise
        return f"cannot read {input_path} as {fmt}: {one_line(err)}"
    if n == 0 and not allow_empty:
        return (f"{input_path} holds no posts (an empty file, only blank lines or no rows); "
                "pass --allow-empty if that is expected")
    return None


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:300] + "..."


def _is_arrow_error(err: BaseException) -> bool:
    try:
        import pyarrow
    except ImportError:
        return False
    return isinstance(err, pyarrow.ArrowException)


features_app = typer.Typer(help="Move detections (a feature store) or captions (a caption store) between "
                                "the SQLite store and a Parquet features dataset", no_args_is_help=True)

CAPTIONS_HELP = ("Move captions (a caption store <-> the dataset's captions/) or detections (a feature store); "
                 "default: captions where the store holds only captions")


def store_kind(store: Path) -> Optional[str]:
    """``captions`` (a caption store), ``detections`` (a feature store) or None (no such
    file, neither or both), read without writing to the file."""
    from ..tagging.features import sqlite_tables

    tables = sqlite_tables(str(store)) & {"captions", "detections"} if store.is_file() else set()
    return next(iter(tables)) if len(tables) == 1 else None


def store_problem(store: Path, captions: bool) -> Optional[str]:
    """A store of the other kind than the rows moved (None if nothing)."""
    kind = store_kind(store)
    if kind == ("detections" if captions else "captions"):
        found, flag = ("a feature store", "--detections") if captions else ("a caption store", "--captions")
        return f"{store} is {found}; pass {flag} to move its rows, or name the other store"
    return None


@features_app.command("export")
def export_command(
    store: Path = typer.Argument(..., help="The SQLite feature store (or caption store)"),
    dataset: str = typer.Argument(..., help="The Parquet features dataset (folder or URI)"),
    signature: Optional[str] = typer.Option(None, "--signature", help="Only this detector (or captioner) signature"),
    captions: Optional[bool] = typer.Option(None, "--captions/--detections", help=CAPTIONS_HELP),
) -> None:
    """SQLite store -> Parquet features dataset (keys already there are skipped)."""
    from ..tagging.features import export_store

    if not store.is_file():
        typer.echo(f"features export: feature store {store} does not exist", err=True)
        raise typer.Exit(1)
    captions = store_kind(store) == "captions" if captions is None else captions
    problem = store_problem(store, captions)
    if problem:
        typer.echo(f"features export: {problem}", err=True)
        raise typer.Exit(1)
    try:
        written = export_store(str(store), dataset, signature, captions=captions)
    except Exception as err:  # a damaged store, an unwritable dataset: one line, exit 1
        typer.echo(f"features export: {type(err).__name__}: {one_line(err)}", err=True)
        raise typer.Exit(1)
    typer.echo(f"exported {'captions ' if captions else ''}to {dataset}: " + json.dumps(written))


@features_app.command("import")
def import_command(
    dataset: str = typer.Argument(..., help="The Parquet features dataset (folder or URI)"),
    store: Path = typer.Argument(..., help="The SQLite feature store (or caption store) to fill"),
    signature: Optional[str] = typer.Option(None, "--signature", help="Only this detector (or captioner) signature"),
    allow_empty: bool = typer.Option(False, "--allow-empty", help="A dataset without features is not an error"),
    captions: Optional[bool] = typer.Option(None, "--captions/--detections",
                                            help=CAPTIONS_HELP + ", or the dataset holds only captions"),
) -> None:
    """Parquet features dataset -> SQLite store, e.g. features computed on a cluster for training here."""
    from ..tagging.features import CaptionDataset, FeatureDataset, import_dataset

    if "://" not in dataset and not Path(dataset).is_dir():
        typer.echo(f"features import: features dataset {dataset} does not exist (a folder)", err=True)
        raise typer.Exit(1)
    if store.is_dir():
        typer.echo(f"features import: {store} is a folder; name the SQLite file to fill", err=True)
        raise typer.Exit(1)
    try:
        if captions is None:
            captions = store_kind(store) == "captions" or (not FeatureDataset(dataset).signatures()
                                                           and bool(CaptionDataset(dataset).signatures()))
        problem = store_problem(store, captions)
        if problem:
            typer.echo(f"features import: {problem}", err=True)
            raise typer.Exit(1)
        if not (CaptionDataset if captions else FeatureDataset)(dataset).signatures() and not allow_empty:
            where = "captions/signatures/ and no captions/sig=..." if captions else "signatures/ and no sig=..."
            typer.echo(f"features import: {dataset} holds no {'captions' if captions else 'features'} (no {where} "
                       "folders); pass --allow-empty if that is expected", err=True)
            raise typer.Exit(1)
        done = import_dataset(dataset, str(store), signature, captions=captions)
    except typer.Exit:
        raise
    except Exception as err:  # a crafted or damaged dataset: name it, one line, exit 1
        typer.echo(f"features import: cannot import {dataset}: {type(err).__name__}: {one_line(err)}", err=True)
        raise typer.Exit(1)
    typer.echo(f"imported {'captions ' if captions else ''}into {store}: " + json.dumps(done))
