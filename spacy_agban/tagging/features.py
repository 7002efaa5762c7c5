"""A Parquet features dataset: the SQLite feature store's role across machines.

Layout (``ROOT`` a local folder or an object-store URI pyarrow supports)::

    ROOT/signatures/<sig>.json            what the detector signature stands for
    ROOT/sig=<sig>/part-<uuid>.parquet    image_key, features, labels, scores, boxes
    ROOT/captions/signatures/<sig>.json   what the captioner signature stands for
    ROOT/captions/sig=<sig>/part-<uuid>.parquet    image_key, caption

Each row is one image's top-k detections keyed by the sha256 of the image bytes
and the detector signature key: the same keys as
:class:`~spacy_agban.detection.store.FeatureStore`, so features move both ways
(:func:`export_store`, :func:`import_dataset`) and training on one machine can
use features computed on a cluster. Writers only add files (no file is ever
rewritten), so many workers can fill one dataset; a key written twice (the
same image under two names in one run) is harmless: readers keep the first.

Generated captions travel the same way (:class:`CaptionDataset`, the
``captions/`` folder), keyed by image and captioner signature as in the
:class:`~spacy_agban.units.caption_store.CaptionStore`.
"""
import json
import uuid
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

from ..detection.store import Detections, FeatureStore
from .core import detections_to_row, row_to_detections

SIGNATURE_DIR = "signatures"
#: The folder of a features dataset that holds captions (its own signatures/ and sig=... folders).
CAPTION_DIR = "captions"


def feature_schema() -> Any:
    import pyarrow as pa

    return pa.schema([
        ("image_key", pa.string()), ("features", pa.binary()), ("labels", pa.list_(pa.string())),
        ("scores", pa.list_(pa.float32())), ("boxes", pa.list_(pa.float32())), ("dim", pa.int32()),
    ])


def _filesystem(root: str) -> Tuple[Any, str]:
    from pyarrow import fs

    if "://" in root:
        return fs.FileSystem.from_uri(root)
    from pathlib import Path

    return fs.LocalFileSystem(), str(Path(root).resolve())


class FeatureDataset:
    """Read and append detections in a Parquet features dataset.

    Also the :class:`~spacy_agban.units.objects.FeatureReader` the batch
    engines attach to the pipeline's object units: :meth:`get_many` reads the
    dataset before the store, and, if ``writable``, :meth:`put_many` appends what
    the detector found.
    """

    def __init__(self, root: str, writable: bool = False):
        self.root = str(root)
        self.writable = writable
        self.fs, self.path = _filesystem(self.root)
        self._index: Dict[str, Dict[str, str]] = {}  # sig -> image key -> file
        # Files whose keys could not be read (sig -> file -> why: any image not found
        # may be in one), keys of files that could not be read past them (sig -> key ->
        # why), and the images a lookup could not read for, until taken by
        # :meth:`take_unread`: a damaged file costs only the images it may hold.
        self._unindexed: Dict[str, Dict[str, str]] = {}
        self._lost: Dict[str, Dict[str, str]] = {}
        self._unread: Dict[str, str] = {}

    def __getstate__(self) -> Dict[str, Any]:  # filesystems and indexes are rebuilt where used
        return {"root": self.root, "writable": self.writable}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__(state["root"], state["writable"])  # type: ignore[misc]

    def _sig_dir(self, sig: str) -> str:
        return f"{self.path}/sig={sig}"

    # -- signatures -----------------------------------------------------------------------

    def register_signature(self, sig: str, description: Dict[str, Any]) -> None:
        target = f"{self.path}/{SIGNATURE_DIR}/{sig}.json"
        if self._exists(target):
            return
        self.fs.create_dir(f"{self.path}/{SIGNATURE_DIR}", recursive=True)
        with self.fs.open_output_stream(target) as out:
            out.write(json.dumps(description, sort_keys=True, indent=2).encode())

    def signatures(self) -> Dict[str, Dict[str, Any]]:
        from pyarrow import fs

        found: Dict[str, Dict[str, Any]] = {}
        selector = fs.FileSelector(f"{self.path}/{SIGNATURE_DIR}", allow_not_found=True)
        for info in self.fs.get_file_info(selector):
            if info.path.endswith(".json"):
                with self.fs.open_input_stream(info.path) as handle:
                    found[info.base_name[: -len(".json")]] = json.loads(handle.read())
        for sig in self._sig_dirs():
            found.setdefault(sig, {})
        return found

    def _sig_dirs(self) -> List[str]:
        from pyarrow import fs

        selector = fs.FileSelector(self.path, allow_not_found=True)
        return sorted(info.base_name[len("sig="):] for info in self.fs.get_file_info(selector)
                      if info.type == fs.FileType.Directory and info.base_name.startswith("sig="))

    def _exists(self, path: str) -> bool:
        from pyarrow import fs

        return self.fs.get_file_info(path).type != fs.FileType.NotFound

    def files(self, sig: str) -> List[str]:
        from pyarrow import fs

        selector = fs.FileSelector(self._sig_dir(sig), allow_not_found=True)
        return sorted(info.path for info in self.fs.get_file_info(selector)
                      if info.type == fs.FileType.File and info.path.endswith(".parquet"))

    # -- rows -----------------------------------------------------------------------------

    def write(self, entries: Sequence[Tuple[str, Detections]], sig: str) -> Optional[str]:
        """Append one part file with these detections (None if there are none)."""
        if not entries:
            return None
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = self._table(entries)
        self.fs.create_dir(self._sig_dir(sig), recursive=True)
        target = f"{self._sig_dir(sig)}/part-{uuid.uuid4().hex}.parquet"
        tmp = target + ".tmp"
        pq.write_table(table, tmp, filesystem=self.fs)
        self.fs.move(tmp, target)  # readers list *.parquet only: never a half-written file
        return target

    def _table(self, entries: Sequence[Tuple[str, Any]]) -> Any:
        """One part file's rows."""
        import pyarrow as pa

        rows = [detections_to_row(det) for _, det in entries]
        return pa.Table.from_pydict({
            "image_key": [key for key, _ in entries], "features": [r[0] for r in rows],
            "labels": [r[1] for r in rows], "scores": [r[2] for r in rows], "boxes": [r[3] for r in rows],
            "dim": [int(det.features.shape[1]) for _, det in entries],
        }, schema=feature_schema())

    @staticmethod
    def _value(row: Dict[str, Any]) -> Any:
        """What a row holds for its image (the inverse of :meth:`_table`)."""
        return _detections(row)

    def keys(self, sig: str) -> Set[str]:
        import pyarrow.parquet as pq

        keys: Set[str] = set()
        for path in self.files(sig):
            keys.update(pq.read_table(path, columns=["image_key"], filesystem=self.fs)["image_key"].to_pylist())
        return keys

    def count(self, sig: str) -> int:
        return len(self.keys(sig))

    def iter_batches(self, sig: str, batch_rows: int = 4096) -> Iterator[List[Tuple[str, Detections]]]:
        """Every distinct key's detections (the first written), in batches."""
        import pyarrow.parquet as pq

        seen: Set[str] = set()
        for path in self.files(sig):
            with self.fs.open_input_file(path) as handle:
                for batch in pq.ParquetFile(handle).iter_batches(batch_size=batch_rows):
                    out = []
                    for row in batch.to_pylist():
                        if row["image_key"] in seen:
                            continue
                        seen.add(row["image_key"])
                        out.append((row["image_key"], self._value(row)))
                    if out:
                        yield out


    # -- lookups (the FeatureReader protocol) ------------------------------------------------

    def _keys_to_files(self, sig: str) -> Dict[str, str]:
        """Which file holds each key (the first written), read once per signature and
        process: one string column per file, about 100 bytes per image in memory.
        Files written later by other workers are not seen: their images are detected
        again, which is harmless (readers keep the first)."""
        index = self._index.get(sig)
        if index is None:
            import pyarrow.parquet as pq

            index = {}
            for path in self.files(sig):
                try:
                    keys = pq.read_table(path, columns=["image_key"], filesystem=self.fs)["image_key"].to_pylist()
                except Exception as err:  # a damaged file: the keys it holds are unknown
                    self._unindexed.setdefault(sig, {})[path] = f"cannot read {path}: {_one_line(err)}"
                    continue
                for key in keys:
                    index.setdefault(key, path)
            self._index[sig] = index
        return index

    def get_many(self, image_keys: Iterable[str], sig: str) -> Dict[str, Detections]:
        """The stored detections of these images. A file that cannot be read is left
        out (its images are misses, read elsewhere by the caller) and each image that
        may be in it is noted for :meth:`take_unread`."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        wanted = list(image_keys)
        try:
            index = self._keys_to_files(sig)
        except Exception as err:  # the dataset cannot even be listed
            self._unread.update(dict.fromkeys(wanted, f"cannot read the features dataset {self.root}: "
                                                      f"{_one_line(err)}"))
            return {}
        by_file: Dict[str, List[str]] = {}
        for key in wanted:
            if key in index:
                by_file.setdefault(index[key], []).append(key)
        found: Dict[str, Detections] = {}
        for path, keys in by_file.items():
            try:
                table = pq.read_table(path, filesystem=self.fs, filters=pc.field("image_key").isin(keys))
                rows = [(row["image_key"], self._value(row)) for row in table.to_pylist()]
            except Exception as err:  # damaged past its keys: none of its images is read from it again
                why = f"cannot read {path}: {_one_line(err)}"
                lost = [k for k, p in index.items() if p == path]
                for key in lost:
                    del index[key]
                self._lost.setdefault(sig, {}).update(dict.fromkeys(lost, why))
                continue
            for key, det in rows:
                found.setdefault(key, det)
        lost, unindexed = self._lost.get(sig, {}), self._unindexed.get(sig, {})
        for key in wanted:
            if key not in found and (key in lost or unindexed):
                self._unread[key] = lost.get(key) or next(iter(unindexed.values()))
        return found

    def take_unread(self) -> Dict[str, str]:
        """The images that lookups since the last call could not read because of a
        damaged file (content key -> why), forgotten once taken."""
        unread, self._unread = self._unread, {}
        return unread

    def put_many(self, entries: Sequence[Tuple[str, Detections]], sig: str, description: Optional[Dict[str, Any]] = None) -> None:
        if not self.writable:
            raise PermissionError(f"the features dataset {self.root} was opened read-only")
        if description is not None:
            self.register_signature(sig, description)
        path = self.write(entries, sig)
        if path is not None and sig in self._index:
            for key, _ in entries:
                self._index[sig].setdefault(key, path)


class CaptionDataset(FeatureDataset):
    """The captions of a features dataset (``ROOT/captions``): the same layout rules
    and lookups as the detections, a caption string per row. Attached to an
    :class:`~spacy_agban.units.captioner.ImageCaptioner` by the batch engines
    (:func:`~.models.attach_captions`): read before its caption store, and given the
    captions it generates."""

    def __init__(self, root: str, writable: bool = False):
        super().__init__(root, writable)
        self.path = f"{self.path}/{CAPTION_DIR}"

    def _table(self, entries: Sequence[Tuple[str, Any]]) -> Any:
        import pyarrow as pa

        return pa.Table.from_pydict({"image_key": [key for key, _ in entries],
                                     "caption": [caption for _, caption in entries]}, schema=caption_schema())

    @staticmethod
    def _value(row: Dict[str, Any]) -> Any:
        caption = row["caption"]
        if not isinstance(caption, str):  # a crafted file: the image is a miss, captioned again
            raise ValueError(f"a caption must be a string, not {type(caption).__name__}")
        return caption


def caption_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("image_key", pa.string()), ("caption", pa.string())])


def _detections(row: Dict[str, Any]) -> Detections:
    return row_to_detections(row["features"], row["labels"], row["scores"], row["boxes"], row.get("dim") or 0)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 200 else text[:200] + "..."


# -- the check a tag job makes before it starts ------------------------------------------------


def _same_type(a: Any, b: Any) -> bool:
    """Arrow types equal up to the name of a list's item field (Parquet writers differ)."""
    import pyarrow as pa

    if pa.types.is_list(a) and pa.types.is_list(b):
        return _same_type(a.value_type, b.value_type)
    return a.equals(b)


def dataset_problem(root: str, signature: Optional[str], detects: bool) -> Optional[str]:
    """What makes ``root`` unusable as the features dataset of a job (None if nothing):
    it does not exist, holds nothing (fine only where the job detects: it fills it),
    holds no features of the detector signature the pipeline was trained with (the
    same), its signatures cannot be read, or no file of that signature can be read
    with the columns a features dataset has. A damaged file among readable ones is
    no reason to stop: its images are looked up in the pipeline's store and detector."""
    from pyarrow import fs

    dataset = FeatureDataset(root)
    try:
        kind = dataset.fs.get_file_info(dataset.path).type
        if kind == fs.FileType.NotFound:
            hint = " (create the folder to start a dataset that this job fills)" if detects else ""
            return f"the features dataset {root} does not exist{hint}"
        if kind != fs.FileType.Directory:
            return f"the features dataset {root} is a file, not a folder"
        sigs = dataset.signatures()
    except Exception as err:
        return f"cannot read the features dataset {root}: {_one_line(err)}"
    wanted = signature if signature else (next(iter(sigs)) if len(sigs) == 1 else None)
    files = dataset.files(wanted) if wanted in sigs else []
    if not files:
        if detects:
            return None  # a new dataset (or signature): the job's detector fills it
        if not sigs:
            return (f"the features dataset {root} holds no features (no sig=... folders of Parquet "
                    "files): fill it with `detect --engine ray` or `features export`")
        return (f"the features dataset {root} holds no features of the detector the pipeline was trained "
                f"with (signature {signature or '?'}; it holds {sorted(sigs)})")
    return _schema_problem(dataset, files)


def _schema_problem(dataset: "FeatureDataset", files: List[str]) -> Optional[str]:
    import pyarrow.parquet as pq

    expected = feature_schema()
    first_error = None
    for path in files:
        try:
            schema = pq.read_schema(path, filesystem=dataset.fs)
        except Exception as err:  # damaged: looked up elsewhere row by row, if another file reads
            first_error = first_error or f"{path}: {_one_line(err)}"
            continue
        for name in ("image_key", "features", "labels", "scores", "boxes"):
            index = schema.get_field_index(name)
            if index < 0 or not _same_type(schema.field(index).type, expected.field(name).type):
                found = "no such column" if index < 0 else str(schema.field(index).type)
                return (f"{path} is not a features dataset file: column {name!r} should be "
                        f"{expected.field(name).type} ({found}); its columns: {schema.names}")
        return None
    return f"no file of the features dataset {dataset.root} can be read (first: {first_error})"


# -- moving features between the SQLite store and the dataset ---------------------------------


def _chunks(items: Iterable[str], size: int) -> Iterator[List[str]]:
    chunk: List[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _store_and_dataset(store_path: str, root: str, captions: bool) -> Tuple[Any, FeatureDataset]:
    """The SQLite store and the part of the dataset that hold the same rows: detections
    (a feature store, ``ROOT/sig=...``) or captions (a caption store, ``ROOT/captions``)."""
    if captions:
        from ..units.caption_store import CaptionStore

        return CaptionStore(store_path), CaptionDataset(root)
    return FeatureStore(store_path), FeatureDataset(root)


def sqlite_tables(path: str) -> Set[str]:
    """The tables of an existing SQLite file, read without writing to it (empty if it
    cannot be read as SQLite): which kind of store it is."""
    import sqlite3
    from pathlib import Path

    try:
        conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
        try:
            return {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.close()
    except sqlite3.Error:
        return set()


def export_store(store_path: str, root: str, signature: Optional[str] = None,
                 rows_per_file: int = 10000, captions: bool = False) -> Dict[str, int]:
    """SQLite store -> features dataset; keys already in the dataset are skipped.
    Returns the rows written per signature. captions: the store is a caption store
    and its captions go to the dataset's ``captions/`` folder."""
    store, dataset = _store_and_dataset(store_path, root, captions)
    known_sigs = store.signatures()
    sigs = [signature] if signature else sorted(known_sigs)
    written: Dict[str, int] = {}
    for sig in sigs:
        if sig not in known_sigs:
            raise ValueError(f"the store {store_path} has no signature {sig!r} (it has {sorted(known_sigs)})")
        dataset.register_signature(sig, known_sigs[sig])
        have = dataset.keys(sig)
        written[sig] = 0
        for chunk in _chunks((k for k in store.keys(sig) if k not in have), rows_per_file):
            found = store.get_many(chunk, sig)
            dataset.write([(k, found[k]) for k in chunk if k in found], sig)
            written[sig] += len(found)
    store.close()
    return written


def import_dataset(root: str, store_path: str, signature: Optional[str] = None,
                   captions: bool = False) -> Dict[str, int]:
    """Features dataset -> SQLite store (one transaction per batch; existing keys
    are replaced by the same features). Returns the rows read per signature.
    captions: the dataset's captions into a caption store."""
    store, dataset = _store_and_dataset(store_path, root, captions)
    known = dataset.signatures()
    sigs = [signature] if signature else sorted(known)
    done: Dict[str, int] = {}
    for sig in sigs:
        if sig not in known:
            raise ValueError(f"the dataset {root} has no signature {sig!r} (it has {sorted(known)})")
        store.register_signature(sig, known[sig] or {"imported_from": "a features dataset"})
        done[sig] = 0
        for entries in dataset.iter_batches(sig):
            store.put_many(entries, sig)
            done[sig] += len(entries)
    store.close()
    return done
