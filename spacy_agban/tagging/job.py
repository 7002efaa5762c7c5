"""A tag job's record, ``_job.json`` in its output folder: what its parts were made from, by content.

The record holds:

- ``settings``: the input columns, the part size, the output format, the precision, where
  images resolve and whether remote ones are fetched (what changes the rows);
- ``model``: a sha256 over what ``spacy.load`` reads from the pipeline folder (``meta.json``,
  ``config.cfg``, ``tokenizer``, ``vocab/`` and each component's folder: its weights), file by
  file; the pipeline's feature store is left out (the job itself adds detections to it);
- ``input``: each input file's size and sha256, the number of posts, and how many repeat an
  earlier post's id.

Each file's size and modification time are kept beside its hash: a rerun hashes again only the
files whose size or time changed, so a 90 MB transformer pipeline is read once per job, not once
per run, and a copy or ``touch`` of the same bytes is still the same job.

:func:`open_job` starts a job in a new or empty folder, or resumes one whose record is the same;
otherwise it refuses, in one line naming what changed, before it writes or removes anything. It
never removes a file it did not write (only the temporary files of its own complete parts), and
a part that is empty or cannot be read back whole is redone, not counted as done.
"""
import hashlib
import json
import os
import warnings
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from .core import PostColumns, post_id
from .features import dataset_problem
from .models import PipelineReads
from .posts import JOB_FILE, Input, InputError, Parts, Segment, plan_parts

#: The record's layout; a folder written by an earlier layout (paths only) is not resumed.
VERSION = 2
_CHUNK = 1 << 20
#: What ``spacy.load`` reads from a pipeline folder besides one folder per component.
PIPELINE_FILES = ("meta.json", "config.cfg", "tokenizer", "vocab")


class DuplicateIdsWarning(UserWarning):
    """Posts of the input share an id: a join of the output by id loses rows."""


# -- content fingerprints ---------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _unchanged(path: Path, cached: Any) -> bool:
    """Whether ``path`` has the size and modification time recorded with its hash."""
    if not isinstance(cached, dict) or not cached.get("sha256"):
        return False
    stat = path.stat()
    return cached.get("size") == stat.st_size and cached.get("mtime_ns") == stat.st_mtime_ns


def _file_entry(path: Path, cached: Any = None) -> Dict[str, Any]:
    if _unchanged(path, cached):
        return dict(cached)
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_file(path)}


def _combined(entries: Dict[str, Dict[str, Any]]) -> str:
    digest = hashlib.sha256()
    for name in sorted(entries):
        digest.update(f"{name}\0{entries[name]['sha256']}\n".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def model_fingerprint(folder: str, components: Sequence[str], skip: Sequence[str] = (),
                      cached: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The pipeline folder's content: every file ``spacy.load`` reads, hashed (those
    whose size and time match ``cached`` keep their recorded hash). ``skip``: files
    the job writes itself (the feature store)."""
    root = Path(folder)
    skipped = {Path(p).resolve() for p in skip}
    old = (cached or {}).get("files") or {}
    entries: Dict[str, Dict[str, Any]] = {}
    for name in (*PIPELINE_FILES, *components):
        path = root / name
        paths = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
        for file in paths:
            if file.resolve() in skipped:
                continue
            rel = file.relative_to(root).as_posix()
            entries[rel] = _file_entry(file, old.get(rel))
    return {"path": str(root), "sha256": _combined(entries), "files": entries}


class _IdScan:
    """The ids of every post, as the output will name them, kept as 8-byte hashes
    with each post's place (20 bytes a post), to count the repeats."""

    def __init__(self) -> None:
        self.hashes = array("Q")
        self.files = array("I")
        self.lines = array("Q")
        self.names: List[str] = []

    def add(self, the_id: str, file: int, line: int) -> None:
        digest = hashlib.blake2b(the_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        self.hashes.append(int.from_bytes(digest, "little"))
        self.files.append(file)
        self.lines.append(line)

    def place(self, i: int, fmt: str) -> str:
        name = self.names[self.files[i]]
        return f"{name}:row{self.lines[i]}" if fmt == "parquet" else f"{name}:{self.lines[i]}"

    def repeats(self, fmt: str) -> Dict[str, Any]:
        """How many posts repeat an earlier post's id, and the first that does."""
        import numpy

        hashes = numpy.frombuffer(self.hashes, dtype=numpy.uint64) if len(self.hashes) else numpy.zeros(0, "uint64")
        order = numpy.argsort(hashes, kind="stable")
        ordered = hashes[order]
        same = ordered[1:] == ordered[:-1]
        count = int(same.sum())
        if not count:
            return {"duplicate_ids": 0}
        later = int(order[1:][same].min())  # stable: a group's first member is its first post
        first = int(numpy.flatnonzero(hashes == hashes[later])[0])
        return {"duplicate_ids": count,
                "duplicate_example": f"{self.place(later, fmt)} repeats the id of {self.place(first, fmt)}"}


def _scan_file(path: Path, number: int, source: Input, scan: _IdScan) -> Dict[str, Any]:
    """Hash one input file and add the ids of its posts (read as :mod:`.posts` reads them)."""
    name = path.name
    columns: PostColumns = source.columns
    if source.fmt == "parquet":
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=65536, columns=[columns.id]):
            for value in batch.column(0).to_pylist():
                scan.add(post_id({columns.id: value}, f"{name}:row{row}", columns)[0], number, row)
                row += 1
        return _file_entry(path)
    digest = hashlib.sha256()
    stat = path.stat()
    with open(path, "rb") as handle:
        for line, raw in enumerate(handle, start=1):  # binary: lines end at b"\n" only, as the reader's
            digest.update(raw)
            if not raw.strip():
                continue
            where = f"{name}:{line}"
            try:
                record = json.loads(raw.decode("utf-8", errors="replace"))
            except ValueError:
                record = None
            scan.add(post_id(record, where, columns)[0] if isinstance(record, dict) else where, number, line)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}


def input_fingerprint(source: Input, cached: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Each input file's size and sha256, the posts and the repeated ids. Files whose
    size and time match ``cached`` are not read again (nor are their ids)."""
    paths = [Path(f) for f in source.files]
    old = (cached or {}).get("files") or {}
    if cached and "duplicate_ids" in cached and len(old) == len(paths) \
            and all(_unchanged(p, old.get(p.name)) for p in paths):
        return dict(cached)
    scan = _IdScan()
    entries: Dict[str, Dict[str, Any]] = {}
    for number, path in enumerate(paths):
        scan.names.append(path.name)
        entries[path.name] = _scan_file(path, number, source, scan)
    return {"path": str(Path(paths[0]).parent if len(paths) > 1 else paths[0]), "sha256": _combined(entries),
            "size": sum(e["size"] for e in entries.values()), "files": entries, "posts": len(scan.hashes),
            **scan.repeats(source.fmt)}


# -- the record and its checks ------------------------------------------------------------------


def job_settings(source: Input, part_size: int, output_format: str, precision: str,
                 image_root: Optional[str], allow_remote: bool) -> Dict[str, Any]:
    """What, besides the model and the input, changes the rows (the batch size does not)."""
    return {"columns": asdict(source.columns), "part_size": part_size, "format": output_format,
            "precision": precision, "image_root": image_root, "allow_remote": allow_remote}


def read_record(folder: Path) -> Optional[Dict[str, Any]]:
    """The record of the job in ``folder`` (None: a new or empty folder). Refuses an
    output that is a file, a folder of other things, or an unreadable record."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"output {folder} is a file, not a folder")
    if not folder.is_dir():
        return None
    path = folder / JOB_FILE
    if not path.exists():
        if any(folder.iterdir()):
            raise InputError(f"output folder {folder} is not empty and holds no {JOB_FILE} (it is not a tag "
                             "job's): use a new or empty output folder")
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read {path} ({type(err).__name__}): use a new output folder") from None
    if not isinstance(record, dict):
        raise InputError(f"{path} does not describe a tag job: use a new output folder")
    return record


def _files_changed(before: Dict[str, Any], after: Dict[str, Any]) -> str:
    old, new = before.get("files") or {}, after.get("files") or {}
    names = sorted(n for n in set(old) | set(new)
                   if (old.get(n) or {}).get("sha256") != (new.get(n) or {}).get("sha256"))
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return shown or "its files"


def what_changed(before: Dict[str, Any], after: Dict[str, Any]) -> Optional[str]:
    """One phrase naming what differs between two records (None: the same job)."""
    if before.get("version") != after["version"]:
        return "its record was written by an earlier version of this command, which did not record content"
    changes = []
    old, new = before.get("settings") or {}, after["settings"]
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if keys:
        changes.append("settings " + ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys))
    for what in ("model", "input"):
        if (before.get(what) or {}).get("sha256") != after[what]["sha256"]:
            changes.append(f"the {what} changed since the job started ({_files_changed(before.get(what) or {}, after[what])})")
    return "; ".join(changes) or None


def part_problem(parts: Parts, index: int, rows: int) -> Optional[str]:
    """Why an existing part cannot count as done (None: it holds its ``rows`` rows)."""
    path = parts.name(index)
    try:
        if path.stat().st_size == 0:
            return "empty (0 bytes)"
        if parts.fmt == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            found = table.num_rows if "id" in table.column_names else -1
        else:
            found = 0
            with path.open(encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        if not isinstance(json.loads(line).get("id"), str):
                            return "a row without an id"
                        found += 1
    except Exception as err:
        return f"cannot be read back ({type(err).__name__})"
    if found != rows:
        return f"holds {found} rows, not {rows}" if found >= 0 else "has no id column"
    return None


@dataclass
class Job:
    """A started or resumed job: its record, the parts done, the parts to redo and why."""

    folder: Path
    record: Dict[str, Any]
    done: Set[int] = field(default_factory=set)
    redo: Dict[int, str] = field(default_factory=dict)

    def notes(self, parts: Parts) -> str:
        """Summary lines on damaged parts and repeated ids ("" if none)."""
        lines = []
        if self.redo:
            first = min(self.redo)
            lines.append(f"redone: {len(self.redo)} damaged part(s) an earlier run left "
                         f"({parts.name(first).name}: {self.redo[first]}).")
        warning = duplicates_warning(self.record["input"])
        if warning:
            lines.append("warning: " + warning)
        return "".join("\n" + line for line in lines)


def duplicates_warning(record: Dict[str, Any]) -> Optional[str]:
    count = record.get("duplicate_ids") or 0
    if not count:
        return None
    return (f"{count} post(s) of the input repeat an earlier post's id ({record.get('duplicate_example')}): "
            "each is tagged and has its own row, so join the output by id with care; "
            "--unique-ids refuses such an input")


def open_job(parts: Parts, settings: Dict[str, Any], model: Dict[str, Any], source: Input,
             plan: Sequence[Sequence[Segment]], resume: bool = True, unique_ids: bool = False) -> Job:
    """Start or resume the job whose parts go to ``parts.folder``.

    model: ``{"path", "components", "skip"}`` (see :func:`model_fingerprint`). Every
    check runs before anything is written or removed; a refusal is an :class:`InputError`.
    """
    folder = parts.folder
    previous = read_record(folder)
    record = {"version": VERSION, "settings": settings,
              "model": model_fingerprint(model["path"], model["components"], model.get("skip", ()),
                                         (previous or {}).get("model")),
              "input": input_fingerprint(source, (previous or {}).get("input"))}
    existing = parts.existing()
    if previous is not None and existing:
        changed = what_changed(previous, record)
        if changed:
            raise InputError(f"{folder} holds parts of another job: {changed}; use a new output folder "
                             "(or the model, input and settings the job started with)")
    if unique_ids and record["input"].get("duplicate_ids"):
        raise InputError(f"{record['input']['duplicate_ids']} post(s) of the input repeat an earlier post's id "
                         f"({record['input'].get('duplicate_example')}) and --unique-ids is given: "
                         "make the ids unique, or leave --unique-ids out to tag them all")
    rows = [sum(seg.count for seg in segments) for segments in plan]
    job = Job(folder, record)
    for index in sorted(k for k in existing if k < len(plan)):
        problem = part_problem(parts, index, rows[index])
        if problem:
            job.redo[index] = problem
        else:
            job.done.add(index)
    if job.done and not resume:
        raise InputError(f"{folder} already holds {len(job.done)} parts; pass --resume to go on "
                         "after them, or use a new output folder")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{JOB_FILE}.{os.getpid()}.tmp"  # two jobs started on one folder write one record each
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, folder / JOB_FILE)
    for index in job.done:  # a leftover of a write cut off after the part was complete
        leftover = parts.name(index).with_name(parts.name(index).name + ".tmp")
        if leftover.is_file():
            leftover.unlink()
    warning = duplicates_warning(record["input"])
    if warning:
        warnings.warn(warning, DuplicateIdsWarning, stacklevel=2)
    return job


# -- what both engines do before they tag ---------------------------------------------------------


def features_problem(features: str, reads: PipelineReads) -> Optional[str]:
    """What makes ``--features`` unusable for this pipeline (None if nothing). A pipeline
    with an image_captioner fills the dataset's captions, as a detector its detections."""
    if not reads.reads_images:
        return (f"--features {features}: the pipeline {reads.model} reads no images (it was trained without "
                "object units and has no image_captioner); leave --features out")
    problem = dataset_problem(features, reads.signature, reads.has_detector or not reads.reads_objects)
    return f"--features: {problem}" if problem else None


def start_job(reads: PipelineReads, source: Input, output: Path, part_size: int, output_format: str,
              features: Optional[str] = None, resume: bool = True,
              unique_ids: bool = False) -> Tuple[Parts, List[List[Segment]], Job]:
    """Every check of a job, on either engine, before it writes anything: the features
    dataset, the input (planned into parts), the output folder and its record."""
    if features is not None:
        problem = features_problem(features, reads)
        if problem:
            raise InputError(problem)
    plan = plan_parts(source, part_size)
    parts = Parts(Path(output), output_format)
    loader = reads.loader_kwargs() if reads.reads_images else {"image_root": None, "allow_remote": False}
    settings = job_settings(source, part_size, output_format, reads.precision, loader["image_root"],
                            loader["allow_remote"])
    model = {"path": reads.model, "components": reads.components, "skip": reads.written_files()}
    job = open_job(parts, settings, model, source, plan, resume=resume, unique_ids=unique_ids)
    return parts, plan, job
