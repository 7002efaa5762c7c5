"""Reading posts (JSONL, Parquet) and writing the output as numbered parts.

Input: a ``.jsonl`` (``.ndjson``, ``.json``) or ``.parquet`` file, or a folder
of them (read in name order). Every non-blank JSONL line and every Parquet row
is one post and gives exactly one output row: a malformed one gives a row with
an ``error``, never nothing.

Output: a folder of ``part-NNNNNN.parquet`` (or ``.jsonl``) files, part ``k``
holding input posts ``k * part_size`` to ``(k + 1) * part_size - 1`` in input
order, plus ``_job.json`` (what the parts were made from). A part is written to
a temporary name and renamed when complete, so an interrupted run leaves only
complete parts, and the next run starts after the last one.
"""
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from .core import Batch, PostColumns, output_schema, parse_lines, parse_records

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
JOB_FILE = "_job.json"


class InputError(ValueError):
    """The input as a whole cannot be read (missing file, unknown format, no id column)."""


def input_files(path: Path) -> Tuple[List[Path], str]:
    """The files to read and their format (``jsonl`` or ``parquet``)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in JSONL_SUFFIXES + PARQUET_SUFFIXES)
        if not files:
            raise InputError(f"{path} holds no .jsonl or .parquet files")
    elif path.is_file():
        files = [path]
    else:
        raise InputError(f"input {path} does not exist")
    formats = {"parquet" if p.suffix.lower() in PARQUET_SUFFIXES else "jsonl" for p in files}
    unknown = [p for p in files if p.suffix.lower() not in JSONL_SUFFIXES + PARQUET_SUFFIXES]
    if unknown:
        raise InputError(f"cannot tell the format of {unknown[0]}: name it .jsonl or .parquet")
    if len(formats) > 1:
        raise InputError(f"{path} mixes JSONL and Parquet files")
    return files, formats.pop()


def count_posts(files: List[Path], fmt: str) -> int:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    total = 0
    for f in files:
        with f.open("rb") as handle:
            total += sum(1 for line in handle if line.strip())
    return total


def check_parquet_columns(files: List[Path], columns: PostColumns) -> PostColumns:
    """Fail on a missing id/text column; an absent image/caption column means none."""
    import pyarrow.parquet as pq

    names = set(pq.read_schema(files[0]).names)
    for field in (columns.id, columns.text):
        if field not in names:
            raise InputError(f"{files[0]} has no column {field!r} (columns: {sorted(names)}); "
                             "name the columns with --id-key/--text-key")
    return PostColumns(
        id=columns.id, text=columns.text,
        image=columns.image if columns.image in names else None,
        caption=columns.caption if columns.caption in names else None,
    )


def iter_posts(path: Path, columns: PostColumns, block: int, skip: int = 0) -> Iterator[Batch]:
    """Parsed post batches of ``block`` posts (the last may be shorter), after
    skipping the first ``skip`` posts."""
    files, fmt = input_files(path)
    if fmt == "parquet":
        columns = check_parquet_columns(files, columns)
        yield from _rebatch(_parquet_batches(files, columns, skip), block)
    else:
        yield from _rebatch(_jsonl_batches(files, columns, skip, block), block)


def _jsonl_batches(files: List[Path], columns: PostColumns, skip: int, block: int) -> Iterator[Batch]:
    seen = 0
    for f in files:
        lines: List[str] = []
        wheres: List[str] = []
        # Bytes, split on b"\n" only: text mode would also split on a bare "\r", which
        # JSON allows as whitespace inside a record, making two broken rows of one post.
        with f.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                seen += 1
                if seen <= skip:
                    continue
                lines.append(raw.decode("utf-8", errors="replace"))
                wheres.append(f"{f.name}:{number}")
                if len(lines) == block:
                    yield parse_lines(lines, wheres, columns)
                    lines, wheres = [], []
        if lines:
            yield parse_lines(lines, wheres, columns)


def _parquet_batches(files: List[Path], columns: PostColumns, skip: int) -> Iterator[Batch]:
    import pyarrow.parquet as pq

    wanted = [c for c in (columns.id, columns.text, columns.image, columns.caption) if c]
    seen = 0
    for f in files:
        reader = pq.ParquetFile(f)
        for batch in reader.iter_batches(batch_size=4096, columns=wanted):
            start = seen
            seen += batch.num_rows
            if seen <= skip:
                continue
            records = batch.to_pylist()
            offset = max(0, skip - start)
            records = records[offset:]
            wheres = [f"{f.name}:row{start + offset + j}" for j in range(len(records))]
            yield parse_records(records, wheres, columns)


def _rebatch(batches: Iterator[Batch], size: int) -> Iterator[Batch]:
    pending: Optional[Batch] = None
    for batch in batches:
        pending = batch if pending is None else {k: pending[k] + batch[k] for k in pending}
        while len(pending["id"]) >= size:
            yield {k: v[:size] for k, v in pending.items()}
            pending = {k: v[size:] for k, v in pending.items()}
    if pending is not None and pending["id"]:
        yield pending


def slices(batch: Batch, size: int) -> Iterator[Batch]:
    n = len(batch["id"])
    for start in range(0, n, size):
        yield {k: v[start : start + size] for k, v in batch.items()}


def concat(batches: List[Batch]) -> Batch:
    out: Batch = {}
    for batch in batches:
        for k, v in batch.items():
            out.setdefault(k, []).extend(v)
    return out


# -- output parts --------------------------------------------------------------------------


class Parts:
    """The numbered output parts of one job in ``folder``."""

    def __init__(self, folder: Path, fmt: str = "parquet"):
        if fmt not in ("parquet", "jsonl"):
            raise ValueError(f"output format must be parquet or jsonl, not {fmt!r}")
        self.folder = Path(folder)
        self.fmt = fmt

    def name(self, index: int) -> Path:
        return self.folder / f"part-{index:06d}.{self.fmt}"

    def complete(self) -> int:
        """How many parts, from part 0 on without a gap, are complete."""
        n = 0
        while self.name(n).exists():
            n += 1
        return n

    def check_job(self, job: Dict[str, Any], resume: bool) -> int:
        """Start or resume the job; returns the number of parts already done."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob("*.tmp"):
            stale.unlink()  # a part cut off mid-write
        path = self.folder / JOB_FILE
        done = self.complete()
        if path.exists():
            before = json.loads(path.read_text())
            if before != job:
                changed = sorted(k for k in set(before) | set(job) if before.get(k) != job.get(k))
                raise InputError(f"{self.folder} holds parts of another job (it differs in {changed}); "
                                 "use a new output folder")
            if done and not resume:
                raise InputError(f"{self.folder} already holds {done} parts; pass --resume to go on "
                                 "after them, or use a new output folder")
        elif any(self.folder.iterdir()):
            raise InputError(f"output folder {self.folder} is not empty and holds no {JOB_FILE}")
        path.write_text(json.dumps(job, indent=2, sort_keys=True))
        return done

    def write(self, index: int, batch: Batch) -> Path:
        target = self.name(index)
        tmp = target.with_name(target.name + ".tmp")
        if self.fmt == "parquet":
            import pyarrow.parquet as pq

            from .core import to_table

            pq.write_table(to_table(batch, output_schema()), tmp)
        else:
            names = list(batch)
            with tmp.open("w", encoding="utf-8") as handle:
                for values in zip(*(batch[k] for k in names)):
                    handle.write(json.dumps(dict(zip(names, values)), ensure_ascii=False) + "\n")
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)  # atomic: a part exists complete or not at all
        return target


def read_output(folder: Path) -> List[Dict[str, Any]]:
    """Every output row of a job folder (parts of either engine, Parquet or JSONL)."""
    folder = Path(folder)
    rows: List[Dict[str, Any]] = []
    parquet = sorted(folder.glob("*.parquet"))
    if parquet:
        import pyarrow.parquet as pq

        for f in parquet:
            rows.extend(pq.read_table(f).to_pylist())
    for f in sorted(folder.glob("*.jsonl")):
        with f.open(encoding="utf-8") as handle:
            rows.extend(json.loads(line) for line in handle if line.strip())
    return rows


def job_description(input_path: Path, columns: PostColumns, part_size: int, fmt: str, model: str) -> Dict[str, Any]:
    return {"input": str(input_path), "columns": asdict(columns), "part_size": part_size,
            "format": fmt, "model": str(model)}
