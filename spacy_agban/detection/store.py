"""A persistent cache of detections on SQLite (stdlib only, no torch).

Detection costs about a second per image on a CPU, so it is done once and reused
every epoch. Entries are keyed by (image content sha256, detector signature key):
a new image file, new weights, a new input size or a new k never reuse old
features. Each entry is one row, written by one ``INSERT`` inside a transaction,
so a killed run loses at most the batch in flight and never leaves half an
entry. WAL journaling lets readers run while a writer writes.

Failures (unreadable images) are logged in their own table, never cached as an
empty result: the next run retries them. A detection that legitimately found no
object *is* cached, with ``n = 0``.
"""
import json
import os
import sqlite3
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS signatures (
    sig TEXT PRIMARY KEY,
    description TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS detections (
    image_key TEXT NOT NULL,
    sig TEXT NOT NULL,
    n INTEGER NOT NULL,
    dim INTEGER NOT NULL,
    features BLOB NOT NULL,
    labels TEXT NOT NULL,
    scores BLOB NOT NULL,
    boxes BLOB NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (image_key, sig)
);
CREATE TABLE IF NOT EXISTS failures (
    name TEXT NOT NULL,
    sig TEXT NOT NULL,
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    last_seen REAL NOT NULL,
    PRIMARY KEY (name, sig)
);
"""


@dataclass
class Detections:
    """The top-k objects of one image, best first.

    features: (n, dim) float32 box-head features; labels: n class names;
    scores: (n,) float32; boxes: (n, 4) float32 x0, y0, x1, y1 in the
    coordinates of the original image (after EXIF rotation).
    """

    features: numpy.ndarray
    labels: List[str]
    scores: numpy.ndarray
    boxes: numpy.ndarray

    def __post_init__(self) -> None:
        self.features = numpy.ascontiguousarray(self.features, dtype="float32")
        self.scores = numpy.ascontiguousarray(self.scores, dtype="float32").reshape(-1)
        self.boxes = numpy.ascontiguousarray(self.boxes, dtype="float32").reshape(-1, 4)
        n = len(self.labels)
        if self.features.ndim != 2 or self.features.shape[0] != n:
            raise ValueError(f"features {self.features.shape} do not match {n} labels")
        if self.scores.shape[0] != n or self.boxes.shape[0] != n:
            raise ValueError("scores, boxes and labels differ in length")

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, k: int) -> "Detections":
        return Detections(self.features[:k], self.labels[:k], self.scores[:k], self.boxes[:k])

    @classmethod
    def empty(cls, dim: int) -> "Detections":
        return cls(numpy.zeros((0, dim), "float32"), [], numpy.zeros(0, "float32"), numpy.zeros((0, 4), "float32"))


class DamagedRowWarning(UserWarning):
    """A stored entry could not be decoded; it is treated as a miss."""


@dataclass
class Failure:
    name: str
    kind: str
    reason: str
    attempts: int
    last_seen: float


class FeatureStore:
    """Detections on disk. Safe to share between threads and forked processes
    (each thread/process opens its own connection on first use)."""

    def __init__(self, path: Union[str, Path], timeout: float = 60.0, create: bool = True):
        """create: make the file (and its folder) if missing, as writers do. Readers
        pass False: a mistyped or relative path that points elsewhere must fail, not
        leave an empty store that silently gives every doc 0 object units."""
        self.path = Path(path)
        self.timeout = timeout
        self.create = create
        self._local = threading.local()
        if create and not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif not create and not self.path.exists():
            raise FileNotFoundError(missing_store_message(self.path))
        else:  # opening touches the file: only a feature store may be opened
            check_is_feature_store(self.path, create)
        self._setup(self._connection())

    def __getstate__(self) -> Dict[str, object]:
        # Connections never travel (pickling for spawned worker processes): reopen there.
        return {"path": self.path, "timeout": self.timeout, "create": self.create}

    def __setstate__(self, state: Dict[str, object]) -> None:
        self.path = state["path"]  # type: ignore[assignment]
        self.timeout = state["timeout"]  # type: ignore[assignment]
        self.create = bool(state.get("create", True))
        self._local = threading.local()

    def _connection(self) -> sqlite3.Connection:
        # A connection must not cross a fork or a thread: keep one per (pid, thread).
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            # mode=rw never creates the file (sqlite's default, rwc, would).
            target, uri = (str(self.path), False) if self.create else (self.path.resolve().as_uri() + "?mode=rw", True)
            conn = sqlite3.connect(target, timeout=self.timeout, isolation_level=None, uri=uri)
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            self._local.conn = conn
            self._local.pid = os.getpid()
        return conn

    def _setup(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise ValueError(
                f"feature store {self.path} has schema version {version}; "
                f"this code reads version {SCHEMA_VERSION}"
            )
        # WAL: readers never block the writer and see only committed entries.
        conn.execute("PRAGMA journal_mode = WAL")
        # NORMAL is safe against a killed process in WAL mode (only power loss
        # can drop the last commits), and far faster than FULL.
        conn.execute("PRAGMA synchronous = NORMAL")
        with self._transaction(conn):
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    class _Tx:
        def __init__(self, conn: sqlite3.Connection):
            self.conn = conn

        def __enter__(self) -> sqlite3.Connection:
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
            self.conn.execute("ROLLBACK" if exc_type else "COMMIT")

    def _transaction(self, conn: Optional[sqlite3.Connection] = None) -> "FeatureStore._Tx":
        return FeatureStore._Tx(conn or self._connection())

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local = threading.local()

    # -- signatures ---------------------------------------------------------------

    def register_signature(self, sig: str, description: Dict[str, object]) -> None:
        with self._transaction() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO signatures (sig, description) VALUES (?, ?)",
                (sig, json.dumps(description, sort_keys=True)),
            )

    def signatures(self) -> Dict[str, Dict[str, object]]:
        rows = self._connection().execute("SELECT sig, description FROM signatures").fetchall()
        return {sig: json.loads(desc) for sig, desc in rows}

    def holds(self, sig: str) -> bool:
        """Whether the store knows this signature (registered, or with any entry)."""
        conn = self._connection()
        return sig in self.signatures() or conn.execute(
            "SELECT 1 FROM detections WHERE sig = ? LIMIT 1", (sig,)
        ).fetchone() is not None

    # -- detections ---------------------------------------------------------------

    def get(self, image_key: str, sig: str) -> Optional[Detections]:
        return self.get_many([image_key], sig).get(image_key)

    def get_many(self, image_keys: Iterable[str], sig: str) -> Dict[str, Detections]:
        """The entries found. A damaged entry (counts that do not match its bytes,
        labels that are not a JSON list of strings) is left out, as a miss, with a
        warning naming its image key: a detector then detects that image again and
        its new entry replaces the damaged one."""
        keys = list(dict.fromkeys(image_keys))
        found: Dict[str, Detections] = {}
        conn = self._connection()
        for start in range(0, len(keys), 500):  # stay under SQLite's variable limit
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(
                "SELECT image_key, n, dim, features, labels, scores, boxes FROM detections "
                f"WHERE sig = ? AND image_key IN ({marks})",
                (sig, *chunk),
            ).fetchall()
            for key, n, dim, features, labels, scores, boxes in rows:
                try:
                    found[key] = _decode_row(n, dim, features, labels, scores, boxes)
                except (ValueError, TypeError) as err:  # JSONDecodeError is a ValueError
                    warnings.warn(
                        f"feature store {self.path}: the entry of image key {key!r} (signature {sig!r}) "
                        f"is damaged ({err}); it is treated as not stored",
                        DamagedRowWarning,
                        stacklevel=3,
                    )
        return found

    def put_many(self, entries: Sequence[Tuple[str, Detections]], sig: str) -> None:
        """Write a batch in one transaction: all of it lands, or none of it."""
        now = time.time()
        rows = [(key, sig, *_encode_row(det), now) for key, det in entries]
        with self._transaction() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO detections "
                "(image_key, sig, n, dim, features, labels, scores, boxes, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def put(self, image_key: str, sig: str, detections: Detections) -> None:
        self.put_many([(image_key, detections)], sig)

    def count(self, sig: Optional[str] = None) -> int:
        conn = self._connection()
        if sig is None:
            return conn.execute("SELECT COUNT(*) FROM detections").fetchone()[0]
        return conn.execute("SELECT COUNT(*) FROM detections WHERE sig = ?", (sig,)).fetchone()[0]

    def keys(self, sig: str) -> Iterator[str]:
        for (key,) in self._connection().execute(
            "SELECT image_key FROM detections WHERE sig = ?", (sig,)
        ):
            yield key

    # -- failures -----------------------------------------------------------------

    def record_failures(self, failures: Sequence[Tuple[str, str, str]], sig: str) -> None:
        """Log ``(name, kind, reason)`` failures; they are reported, not cached."""
        now = time.time()
        with self._transaction() as conn:
            conn.executemany(
                "INSERT INTO failures (name, sig, kind, reason, attempts, last_seen) "
                "VALUES (?, ?, ?, ?, 1, ?) ON CONFLICT (name, sig) DO UPDATE SET "
                "kind = excluded.kind, reason = excluded.reason, "
                "attempts = attempts + 1, last_seen = excluded.last_seen",
                [(name, sig, kind, reason, now) for name, kind, reason in failures],
            )

    def clear_failures(self, names: Sequence[str], sig: str) -> None:
        with self._transaction() as conn:
            conn.executemany(
                "DELETE FROM failures WHERE name = ? AND sig = ?", [(n, sig) for n in names]
            )

    def failures(self, sig: str) -> List[Failure]:
        rows = self._connection().execute(
            "SELECT name, kind, reason, attempts, last_seen FROM failures WHERE sig = ? ORDER BY name",
            (sig,),
        ).fetchall()
        return [Failure(*row) for row in rows]


def missing_store_message(path: Path, looked_for: Optional[Path] = None, saved: Optional[Path] = None) -> str:
    """path: as configured; looked_for: where it was looked for (default: against the
    current folder); saved: where the pipeline was saved with it, if looked there too."""
    where = looked_for if looked_for is not None else path.resolve()
    also = f", nor at {saved}, where the pipeline was saved with it" if saved is not None else ""
    return (
        f"feature store {str(path)!r} not found (looked for {where}; a relative path "
        f"resolves against the current folder{also}). Fill it with `python -m spacy_agban detect`, "
        "or set the store path of the object units."
    )


#: How long an empty file may take to become a database (a writer that just created
#: it writes the header within milliseconds); only an empty file waits.
_EMPTY_FILE_GRACE_S = 0.3


_SQLITE_NOTADB = 26  # "file is not a database"


def _describe(err: sqlite3.Error) -> str:
    name = getattr(err, "sqlite_errorname", None)
    return f"{err}, {name}" if name else str(err)


class NotAFeatureStore(ValueError):
    """The path holds something other than a feature store: it is left untouched."""


def _read_schema(path: Path) -> Tuple[int, set]:
    """The user_version and table names of an SQLite file, by reads only.

    Read-only first (a check must not change what it checks). A read-only connection
    to a WAL database that another process is writing can fail with "disk I/O error"
    (it cannot set up the shared-memory index); a plain connection that only reads
    changes nothing in the database either, so that is the fallback.
    """
    def read(conn: sqlite3.Connection) -> Tuple[int, set]:
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            return version, tables
        finally:
            conn.close()

    try:
        return read(sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=60.0))
    except sqlite3.OperationalError:
        return read(sqlite3.connect(str(path), timeout=60.0))


def check_is_feature_store(path: Path, create: bool = True) -> None:
    """Raise :class:`NotAFeatureStore` unless ``path`` is a feature store (or, for a
    writer, an SQLite database that holds nothing yet: what a killed first run leaves).

    Reads only: an empty file, a file of another format or another program's database
    is never given a schema (opening a path with SQLite writes to it).

    The file is read through SQLite only, never opened and closed by a handle of our own:
    closing any handle of a file drops every POSIX lock this process holds on it, those of
    its open SQLite connections included. Another process's connection would then take
    itself for the last one, checkpoint and delete the WAL under them, and later opens in
    this process fail with "disk I/O error" (SQLITE_IOERR_SHORT_READ) as long as it runs.
    """
    def refuse(what: str) -> NotAFeatureStore:
        return NotAFeatureStore(
            f"{path} is not a feature store ({what}); it was left untouched. Name a feature "
            "store, or a path that does not exist yet to make a new one."
        )

    if not path.is_file():
        raise refuse("not a regular file")
    waited = 0.0
    while path.stat().st_size == 0 and waited < _EMPTY_FILE_GRACE_S:
        time.sleep(0.05)
        waited += 0.05
    if path.stat().st_size == 0:
        raise refuse("an empty file")
    try:
        version, tables = _read_schema(path)
    except sqlite3.DatabaseError as err:
        if getattr(err, "sqlite_errorcode", None) == _SQLITE_NOTADB:
            raise refuse("not an SQLite database") from None
        raise refuse(f"a damaged SQLite database ({_describe(err)})") from None
    if version != 0 or "detections" in tables:
        return  # a store, or a versioned database that _setup refuses by its version
    if version == 0 and not tables and create:
        return
    if not tables:
        raise refuse("an SQLite database without tables")
    raise refuse(f"an SQLite database of other tables: {', '.join(sorted(tables)[:5])}")


def _encode_row(det: Detections) -> Tuple[int, int, bytes, str, bytes, bytes]:
    return (
        len(det),
        int(det.features.shape[1]),
        det.features.astype("<f4").tobytes(),
        json.dumps(list(det.labels)),
        det.scores.astype("<f4").tobytes(),
        det.boxes.astype("<f4").tobytes(),
    )


def _decode_row(n: int, dim: int, features: bytes, labels: str, scores: bytes, boxes: bytes) -> Detections:
    """Raises ValueError or TypeError on a row whose parts do not agree."""
    names = json.loads(labels)
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"labels are not a JSON list of strings: {_short(labels)}")
    if not isinstance(n, int) or not isinstance(dim, int) or n != len(names):
        raise ValueError(f"n={n!r}, dim={dim!r} do not match {len(names)} labels")
    return Detections(
        features=numpy.frombuffer(features, dtype="<f4").reshape(n, dim).astype("float32"),
        labels=names,
        scores=numpy.frombuffer(scores, dtype="<f4").astype("float32"),
        boxes=numpy.frombuffer(boxes, dtype="<f4").reshape(n, 4).astype("float32"),
    )


def _short(text: object, n: int = 60) -> str:
    text = repr(text)
    return text if len(text) <= n else text[:n] + "..."
