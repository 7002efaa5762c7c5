"""Reading posts (JSONL, Parquet) and writing the output as numbered parts.

Input: a ``.jsonl`` (``.ndjson``, ``.json``) or ``.parquet`` file, or a folder
of them (read in name order). Every non-blank JSONL line and every Parquet row
is one post and gives exactly one output row: a malformed one gives a row with
an ``error``, never nothing.

Both engines read the input the same way: :func:`plan_parts` cuts it into parts
of ``part_size`` posts (one pass over JSONL files, in binary: lines end at
``b"\n"`` only), and :func:`read_part` reads and parses one part (on the Ray
engine, in a worker), naming each post by its place (``file:line``).

Output: a folder of ``part-NNNNNN.parquet`` (or ``.jsonl``) files, part ``k``
holding input posts ``k * part_size`` to ``(k + 1) * part_size - 1`` in input
order, plus ``_job.json`` (what the parts were made from, by content: :mod:`.job`).
A part is written to a temporary name and renamed when complete, so an
interrupted run leaves only complete parts, and the next run redoes only the
missing ones (and any that cannot be read back whole).
"""
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Set, Tuple

from .core import POST_COLUMNS, Batch, PostColumns, output_schema, parse_lines, parse_records

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


def count_posts(files: Sequence[Path], fmt: str) -> int:
    """How many posts ``files`` hold (non-blank JSONL lines, split on ``b"\n"`` as
    :func:`plan_parts` does; Parquet rows from the footers), without parsing them."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    total = 0
    for f in files:
        with open(f, "rb") as handle:
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


# -- parts: the unit of work, of output and of resuming, for both engines ---------------------


@dataclass(frozen=True)
class Segment:
    """Consecutive posts of one file. JSONL: ``offset`` is the byte offset of the
    first post's line and ``line`` its number (1-based); Parquet: both are the
    first row's index (0-based)."""

    file: str
    offset: int
    line: int
    count: int


@dataclass(frozen=True)
class Input:
    """What to read: the files, their format, and the columns to read from them."""

    files: Tuple[str, ...]
    fmt: str
    columns: PostColumns


def open_input(path: Path, columns: PostColumns) -> Input:
    """The files of ``path``, their format and (Parquet) the columns they hold."""
    files, fmt = input_files(Path(path))
    if fmt == "parquet":
        columns = check_parquet_columns(files, columns)
    return Input(tuple(str(f) for f in files), fmt, columns)


def plan_parts(source: Input, part_size: int) -> List[List[Segment]]:
    """Split the input into parts of ``part_size`` posts (the last may be shorter;
    a part may span files). One pass over JSONL files to find where each part
    starts; Parquet files only have their footers read."""
    if part_size < 1:
        raise InputError(f"the part size must be at least 1, not {part_size}")
    parts: List[List[Segment]] = []
    current: List[Segment] = []
    filled = 0

    def add(file: str, offset: int, line: int, count: int) -> None:
        nonlocal current, filled
        current.append(Segment(file, offset, line, count))
        filled += count
        if filled == part_size:
            parts.append(current)
            current, filled = [], 0

    for file in source.files:
        if source.fmt == "parquet":
            import pyarrow.parquet as pq

            rows = pq.ParquetFile(file).metadata.num_rows
            row = 0
            while row < rows:
                take = min(part_size - filled, rows - row)
                add(file, row, row, take)
                row += take
            continue
        start = start_line = None
        count = 0
        offset = 0
        with open(file, "rb") as handle:
            for number, raw in enumerate(handle, start=1):  # binary: lines end at b"\n" only
                if raw.strip():
                    if start is None:
                        start, start_line = offset, number
                    count += 1
                    if filled + count == part_size:
                        add(file, start, start_line, count)  # type: ignore[arg-type]
                        start = start_line = None
                        count = 0
                offset += len(raw)
        if count:
            add(file, start, start_line, count)  # type: ignore[arg-type]
    if current:
        parts.append(current)
    return parts


def read_part(source: Input, segments: Sequence[Segment]) -> Batch:
    """The parsed posts of one part (:data:`~.core.POST_COLUMNS`), each named by its
    place (``file:line`` or ``file:row<n>``) for the messages about it."""
    batches = [_read_segment(source, seg) for seg in segments]
    return concat(batches) if batches else {name: [] for name in POST_COLUMNS}


def _read_segment(source: Input, seg: Segment) -> Batch:
    name = Path(seg.file).name
    if source.fmt == "parquet":
        import pyarrow.parquet as pq

        columns = source.columns
        wanted = [c for c in (columns.id, columns.text, columns.image, columns.caption) if c]
        records: List[Any] = []
        seen = 0
        for batch in pq.ParquetFile(seg.file).iter_batches(batch_size=4096, columns=wanted):
            if seen + batch.num_rows > seg.offset and len(records) < seg.count:
                lo = max(0, seg.offset - seen)
                records.extend(batch.slice(lo, seg.count - len(records)).to_pylist())
            seen += batch.num_rows
            if len(records) >= seg.count:
                break
        wheres = [f"{name}:row{seg.offset + j}" for j in range(len(records))]
        return parse_records(records, wheres, columns)
    lines: List[str] = []
    wheres: List[str] = []
    with open(seg.file, "rb") as handle:
        handle.seek(seg.offset)
        for number, raw in enumerate(handle, start=seg.line):
            if not raw.strip():
                continue
            lines.append(raw.decode("utf-8", errors="replace"))
            wheres.append(f"{name}:{number}")
            if len(lines) == seg.count:
                break
    return parse_lines(lines, wheres, source.columns)


def segments_to_json(segments: Sequence[Segment]) -> str:
    return json.dumps([asdict(s) for s in segments])


def segments_from_json(text: str) -> List[Segment]:
    return [Segment(**s) for s in json.loads(text)]


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

    def existing(self) -> Set[int]:
        """The indices of the parts in the folder, complete or not (a Ray job writes
        them in any order; :func:`~.job.open_job` reads each back before counting it done)."""
        prefix, suffix = "part-", f".{self.fmt}"
        return {int(p.name[len(prefix):-len(suffix)]) for p in self.folder.glob(f"{prefix}*{suffix}")
                if p.name[len(prefix):-len(suffix)].isdigit()}

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
