"""The single-machine engine of ``python -m spacy_agban tag``.

One process, no cluster: read a part of posts, then for each batch of it read
and hash the images, look them up in the features dataset (if given) and the
pipeline's feature store and detect the misses (the pipeline's own object
units), run ``nlp.pipe``, and write the part. Resumable: see :mod:`.posts`.
"""
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from . import core
from .models import attach_features, load_tagger, object_units_block, unit_overrides
from .posts import Parts, concat, job_description, open_input, plan_parts, read_part, slices


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
) -> Dict[str, Any]:
    """Tag every post of ``input_path`` into numbered parts under ``output``.

    features: a Parquet features dataset read before the pipeline's store (new
    detections are added to it). after_part: called with each part's index once
    it is written (tests use it to interrupt a run). precision: the transformer's
    (fp32, bf16, int8; ``spacy_agban.inference.precision``).
    """
    input_path = Path(input_path).resolve()
    source = open_input(input_path, columns)
    parts = Parts(Path(output), output_format)
    done = parts.check_job(job_description(input_path, columns, part_size, output_format, model, precision), resume)
    plan = plan_parts(source, part_size)
    _, block = object_units_block(model)
    device = f"cuda:{gpu_id}" if gpu_id >= 0 else None
    nlp = load_tagger(model, unit_overrides(block, image_root, allow_remote, device), gpu_id=gpu_id,
                      precision=precision)
    units = _object_units(nlp)
    if units is not None:
        units.max_warnings = 0  # a bad image is an error row, not a warning
        attach_features(units, features)
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
                if units is None:
                    counts["images_not_read"] += sum(ref is not None for ref in batch["image"])
                else:
                    clock = time.perf_counter()
                    batch = core.load_images(batch, units.loader)
                    stage_seconds["load"] += time.perf_counter() - clock
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
    return {"engine": "local", "posts": counts["posts"], "posts_in_output": skipped + counts["posts"],
            "parts_skipped": len(done), "parts": len(plan), "parts_written": written,
            "seconds": seconds, "posts_per_second": counts["posts"] / seconds if seconds > 0 else 0.0,
            "counts": dict(counts), "stage_seconds": dict(stage_seconds), "summary": summary}


def _object_units(nlp: Any) -> Any:
    """The pipeline's object units when it was trained with objects, else None."""
    if not core.uses_objects(nlp):
        return None
    for pipe in core.agban_pipes(nlp):
        if pipe.object_units is not None:
            return pipe.object_units
    return None


def _bar(total: int, initial: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="post", desc="tag", disable=not enabled)
