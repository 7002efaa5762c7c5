"""``python -m spacy_agban detect``: fill the feature store ahead of training.

Detection is far too slow to repeat every epoch (about 1-2 s per image with
Mask R-CNN on a CPU), so it runs once here; training and evaluation then read
the store. The command is resumable (images already stored are skipped) and
never fails the workflow for lack of images: the model then uses captions/text.
"""
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Dict, List, Optional, Tuple

import typer

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
DETECTORS = ("maskrcnn", "mobilenet")
#: Images handed to ObjectUnits at once: a progress update and a store commit each.
CHUNK = 32


def list_folder_images(folder: Path) -> List[str]:
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def list_docbin_images(path: Path) -> List[str]:
    """Distinct ``doc._.image`` values of a DocBin, in corpus order."""
    import spacy
    from spacy.tokens import DocBin

    try:
        docbin = DocBin(store_user_data=True).from_disk(path)
        refs = [doc._.image for doc in docbin.get_docs(spacy.blank("en").vocab)]
    except Exception as err:  # msgpack/zlib/spaCy errors of a file that is no DocBin
        message = " ".join(str(err).split())[:200]
        raise typer.BadParameter(f"cannot read {path} as a DocBin ({type(err).__name__}: {message})") from None
    return list(dict.fromkeys(ref for ref in refs if isinstance(ref, str) and ref))


def build_detector(
    detector: str, weights: Optional[str], min_size: int, max_size: Optional[int],
    top_k: int, batch_size: int, score_threshold: float, device: str,
) -> Any:
    from ..detection.detector import make_fasterrcnn_mobilenet_detector, make_mask_rcnn_detector

    if detector not in DETECTORS:
        raise typer.BadParameter(f"--detector must be one of {DETECTORS}, not {detector!r}")
    make = make_mask_rcnn_detector if detector == "maskrcnn" else make_fasterrcnn_mobilenet_detector
    # torchvision's ratio (800 → 1333) keeps the usual aspect ratios unclipped.
    max_size = max_size or round(min_size * 1333 / 800)
    weights_arg = None if weights in ("random", "none") else weights
    return make(
        weights=weights_arg, top_k=top_k, score_threshold=score_threshold, min_size=min_size,
        max_size=max_size, device=device, batch_size=batch_size,
    )


def collect_sources(source: Path, image_root: Optional[Path]) -> Tuple[Optional[List[str]], Optional[Path], str]:
    """Image references and the root they resolve against, or None and why not."""
    if source.suffix == ".spacy":
        if not source.is_file():
            raise typer.BadParameter(f"DocBin {source} does not exist")
        refs = list_docbin_images(source)
        if not refs:
            return None, image_root, f"no doc in {source} has an image (doc._.image)"
        root = image_root
        if root is not None and (not root.is_dir() or not any(root.iterdir())):
            return None, root, f"image folder {root} is missing or empty"
        return refs, root, ""
    root = source
    if not root.is_dir():  # named on the command line: a typo, not a corpus without images
        raise typer.BadParameter(f"image folder {root} does not exist")
    refs = list_folder_images(root)
    if not refs:
        return None, root, f"image folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})"
    return refs, root, ""


def checked_sources(source: Any, image_root: Any, store: Any, detector: str, engine: str, min_size: int,
                    max_size: int, top_k: int, batch_size: int, limit: Optional[int], actors: int) -> Tuple[Any, Any, str]:
    """``detect``'s argument checks and the images it will read (at most ``limit``), for
    both engines: a bad argument ends the command with one line and exit 1; no images
    (``refs`` None) is said once, with the reason."""
    try:
        check_detect_arguments(store, detector, engine, min_size, max_size, top_k, batch_size, limit, actors)
        refs, root, why_not = collect_sources(source, image_root)
    except typer.BadParameter as err:
        typer.echo(f"detect: {err}", err=True)
        raise typer.Exit(1)
    if refs is None:
        typer.echo(f"detect: {why_not}; nothing to do. The model will use captions/text only.")
        return None, root, why_not
    return (refs[:limit] if limit is not None else refs), root, why_not


def detect_command(
    source: Path = typer.Argument(..., help="A .spacy DocBin whose docs have doc._.image paths, or an image folder"),
    store: Path = typer.Argument(..., help="The feature store (SQLite file) to fill"),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Folder the DocBin's image paths are relative to"),
    detector: str = typer.Option("maskrcnn", "--detector", help="maskrcnn (the paper's) or mobilenet (faster)"),
    weights: Optional[str] = typer.Option(
        "DEFAULT", "--weights",
        help="DEFAULT (torchvision COCO weights, downloaded), a local .pth/.safetensors file, or 'random' (tests only)",
    ),
    min_size: int = typer.Option(800, "--min-size", help="Input size (short side), e.g. 800, or 480 for speed"),
    max_size: Optional[int] = typer.Option(None, "--max-size", help="Long-side cap; default min_size * 1333/800"),
    top_k: int = typer.Option(3, "--top-k", help="Objects kept per image"),
    batch_size: int = typer.Option(4, "--batch-size", help="Images per detector forward pass"),
    score_threshold: float = typer.Option(0.05, "--score-threshold", help="Minimum class score of an object"),
    device: str = typer.Option("auto", "--device", help="auto (CUDA if available), cpu, cuda, cuda:1"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Process at most this many images"),
    allow_remote: bool = typer.Option(False, "--allow-remote", help="Fetch http(s) image URLs"),
    engine: Annotated[str, typer.Option("--engine", help="local (STORE: SQLite) or ray (STORE: a Parquet features dataset)")] = "local",
    num_gpus: Annotated[Optional[float], typer.Option("--num-gpus", help="ray: GPUs per detect actor (default: 1 if the cluster has one)")] = None,
    actors: Annotated[int, typer.Option("--actors", help="ray: detect actors")] = 1,
    address: Annotated[Optional[str], typer.Option("--address", help="ray: join this cluster (default: a local one)")] = None,
) -> Dict[str, Any]:
    """Detect objects once and store their 1024-d features for training and evaluation."""
    refs, root, why_not = checked_sources(source, image_root, store, detector, engine, min_size, max_size,
                                          top_k, batch_size, limit, actors)
    if refs is None:
        return {"images": 0, "reason": why_not}
    if engine != "local":
        # --engine ray is run by `python -m spacy_agban detect` (spacy_agban.cli.tag), which
        # comes here for local runs: detection/ never imports the batch package.
        typer.echo(f"detect: engine {engine!r} is not run here: use `python -m spacy_agban detect`", err=True)
        raise typer.Exit(1)
    from ..units.objects import ObjectUnits

    try:
        det = build_detector(detector, weights, min_size, max_size, top_k, batch_size, score_threshold, device)
    except Exception as err:  # no internet for DEFAULT, a bad file: say so, fail
        typer.echo(detector_error_message(detector, err), err=True)
        raise typer.Exit(1)
    units = ObjectUnits(store=store, detector=det, image_root=root, allow_remote=allow_remote,
                        top_k=top_k, record_failures=True, max_warnings=0)
    summary = run_detection(units, refs)
    typer.echo(format_summary(summary, units, store))
    return summary


def check_detect_arguments(store: Path, detector: str, engine: str, min_size: int, max_size: Optional[int],
                           top_k: int, batch_size: int, limit: Optional[int], actors: int) -> None:
    """Raise typer.BadParameter, before anything is read or built, on arguments that cannot work."""
    if detector not in DETECTORS:
        raise typer.BadParameter(f"--detector must be one of {', '.join(DETECTORS)}, not {detector!r}")
    if engine not in ("local", "ray"):
        raise typer.BadParameter(f"--engine must be local or ray, not {engine!r}")
    for option, value in (("--min-size", min_size), ("--top-k", top_k), ("--batch-size", batch_size),
                          ("--actors", actors)):
        if value < 1:
            raise typer.BadParameter(f"{option} must be at least 1, not {value}")
    if max_size is not None and max_size < min_size:
        raise typer.BadParameter(f"--max-size ({max_size}) must be at least --min-size ({min_size})")
    if limit is not None and limit < 1:
        raise typer.BadParameter(f"--limit must be at least 1, not {limit}")
    if engine == "local" and store.is_dir():
        raise typer.BadParameter(f"the store {store} is a folder; name the SQLite file to fill (e.g. {store / 'objects.sqlite'})")
    if engine == "local" and store.exists():
        from ..detection.store import NotAFeatureStore, check_is_feature_store

        try:
            check_is_feature_store(store, create=True)
        except NotAFeatureStore as err:
            raise typer.BadParameter(str(err)) from None


def detector_error_message(detector: str, err: BaseException) -> str:
    """One message for a detector that cannot be built: the reason, and the offline
    hint only where the failure was the download."""
    import urllib.error

    reason = " ".join(str(err).split())
    message = f"detect: cannot build the {detector} detector: {reason}"
    if isinstance(err, (urllib.error.URLError, ConnectionError, TimeoutError)):
        message += "\nWithout internet, pass --weights with a local .pth/.safetensors file."
    return message


def run_detection(units: Any, refs: List[str]) -> Dict[str, Any]:
    from tqdm import tqdm

    counts: Counter = Counter()
    failures: List[Tuple[str, str]] = []
    start = time.perf_counter()
    with tqdm(total=len(refs), unit="img", desc="detect") as bar:
        for first in range(0, len(refs), CHUNK):
            chunk = refs[first : first + CHUNK]
            for outcome in units.detections_for(chunk):
                counts[outcome.status] += 1
                if outcome.status in ("failed", "missing"):
                    failures.append((outcome.name or "?", outcome.reason or ""))
            bar.update(len(chunk))
            bar.set_postfix(detected=counts["detected"], cached=counts["cached"], missing=counts["missing"])
    seconds = time.perf_counter() - start
    return {
        "images": len(refs),
        "detected": counts["detected"],
        "cached": counts["cached"],
        "missing": counts["missing"],
        "failed": counts["failed"],
        "seconds": seconds,
        "images_per_second": counts["detected"] / seconds if seconds > 0 else 0.0,
        "failures": failures,
    }


def format_summary(summary: Dict[str, Any], units: Any, store: Path) -> str:
    lines = [
        f"detect: {summary['images']} images: {summary['detected']} detected, {summary['cached']} "
        f"already in the store, {summary['missing']} missing, {summary['failed']} failed; "
        f"{summary['images_per_second']:.2f} images/s detected, {summary['seconds']:.1f} s in all.",
        f"store {store} (signature {units.signature}): {units.store.count(units.signature)} images.",
    ]
    if summary["failures"]:
        lines.append("Not used (first 10): " + "; ".join(f"{n}: {r}" for n, r in summary["failures"][:10]))
    if summary["missing"] and summary["missing"] == summary["images"]:
        lines.append("No image was found: check --image-root. Docs without images use captions/text.")
    return "\n".join(lines)


if __name__ == "__main__":
    typer.run(detect_command)
