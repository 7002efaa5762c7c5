"""The single-machine engine of ``python -m spacy_agban tag``.

One process, no cluster: read a part of posts, then for each batch of it read
and hash the images, look them up in the features dataset (if given) and the
pipeline's feature store and detect the misses (the pipeline's own object
units), run ``nlp.pipe``, and write the part. Resumable: see :mod:`.posts` and
:mod:`.job` (what a job records and checks before it starts).
"""
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from . import core
from .job import start_job
from .models import attach_captions, attach_features, describe_pipeline, load_tagger
from .posts import InputError, concat, open_input, read_part, slices


def run_local(
    model: str,
    input_path: Path,
    output: Path,
    columns: core.PostColumns = core.PostColumns(),
    part_size: int = 10000,
    batch_size: int = 64,
    output_format: str = "parquet",
    gpu_id: int = -1,
    image_root: Optional[str] = None,
    allow_remote: Optional[bool] = None,
    resume: bool = True,
    progress: bool = True,
    features: Optional[str] = None,
    after_part: Optional[Callable[[int], None]] = None,
    precision: str = "fp32",
    unique_ids: bool = False,
) -> Dict[str, Any]:
    """Tag every post of ``input_path`` into numbered parts under ``output``.

    features: a Parquet features dataset read before the pipeline's stores (new
    detections and generated captions are added to it). after_part: called with each part's index once
    it is written (tests use it to interrupt a run). precision: the transformer's
    (fp32, bf16, int8; ``spacy_agban.inference.precision``). unique_ids: refuse an
    input in which posts share an id (else a warning says how many).
    """
    input_path = Path(input_path).resolve()
    source = open_input(input_path, columns)
    device = f"cuda:{gpu_id}" if gpu_id >= 0 else None
    reads = describe_pipeline(model, image_root, allow_remote, device, precision)
    parts, plan, job = start_job(reads, source, Path(output), part_size, output_format, features, resume, unique_ids)
    done = job.done
    try:
        nlp = load_tagger(reads, gpu_id=gpu_id)
    except OSError as err:  # weights not downloaded (the captioner's, the detector's), a damaged folder
        raise InputError(f"cannot load the pipeline {model}: {' '.join(str(err).split())}") from None
    units = _object_units(nlp) if reads.reads_objects else None
    if units is not None:
        units.max_warnings = 0  # a bad image is an error row, not a warning
        attach_features(units, features)
    captioner = core.captioner_of(nlp)
    if captioner is not None:
        captioner.skipped.limit = 0  # as for objects: a bad image is an error row
        attach_captions(captioner, features)
    total = sum(seg.count for segments in plan for seg in segments)
    earlier_parts = [k for k in done if k < len(plan)]
    skipped = sum(seg.count for k in earlier_parts for seg in plan[k])  # posts an earlier run wrote
    counts: Counter = Counter()
    stage_seconds: Counter = Counter()
    start = time.perf_counter()
    bar = _bar(total, skipped, progress)
    written = 0
    try:
        for index, segments in enumerate(plan):
            if index in done:
                continue
            part = read_part(source, segments)
            outputs = []
            for batch in slices(part, batch_size):
                if units is None and captioner is None:
                    counts["images_not_read"] += sum(ref is not None for ref in batch["image"])
                else:
                    clock = time.perf_counter()
                    batch = core.load_images(batch, (units or captioner).loader)
                    stage_seconds["load"] += time.perf_counter() - clock
                if captioner is not None:
                    clock = time.perf_counter()
                    batch = core.caption(batch, captioner)
                    counts.update(f"caption:{status}" for status in batch["caption_status"])
                    stage_seconds["caption"] += time.perf_counter() - clock
                if units is not None:
                    clock = time.perf_counter()
                    batch = core.detect(batch, units)
                    stage_seconds["detect"] += time.perf_counter() - clock
                clock = time.perf_counter()
                out = core.tag(batch, nlp, batch_size=batch_size)
                stage_seconds["tag"] += time.perf_counter() - clock
                core.count_rows(out, counts)
                outputs.append(out)
                bar.update(len(out["id"]))
                bar.set_postfix(errors=counts["posts_with_errors"])
            parts.write(index, concat(outputs))
            written += 1
            if after_part is not None:
                after_part(index)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    summary = core.format_summary(counts, seconds, "local")
    summary += core.resume_note(output, counts["posts"], skipped, len(earlier_parts))
    summary += core.images_not_read_note(counts["images_not_read"])
    summary += job.notes(parts)
    return {"engine": "local", "posts": counts["posts"], "posts_in_output": skipped + counts["posts"],
            "parts_skipped": len(done), "parts": len(plan), "parts_written": written,
            "seconds": seconds, "posts_per_second": counts["posts"] / seconds if seconds > 0 else 0.0,
            "counts": dict(counts), "stage_seconds": dict(stage_seconds), "summary": summary,
            "parts_redone": sorted(job.redo), "duplicate_ids": job.record["input"].get("duplicate_ids", 0)}


def _object_units(nlp: Any) -> Any:
    """The loaded pipeline's object units (the pipeline reads images: :class:`.models.PipelineReads`)."""
    for pipe in core.agban_pipes(nlp):
        if pipe.object_units is not None:
            return pipe.object_units
    return None


def _bar(total: int, initial: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="post", desc="tag", disable=not enabled)
