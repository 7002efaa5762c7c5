"""A persistent cache of generated captions on SQLite (stdlib only, no torch).

An image-to-text model takes from a fraction of a second (BLIP base on a GPU) to
seconds (on a CPU) per image, so a caption is generated once and read back by every
later run: a second ``nlp.pipe``, ``spacy evaluate``, ``explain``, a resumed ``tag``.
Entries are keyed by (image content sha256, captioner signature key), as the object
features of :mod:`spacy_agban.detection.store`: another image file, other weights or
other generation settings never reuse an old caption. One ``INSERT`` per batch inside
a transaction, WAL journaling, one connection per (process, thread), so forked
``nlp.pipe(n_process=2)`` workers and Ray actors on one machine share the file.
"""
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Dict, Iterable, Iterator, Optional, Sequence, Tuple, Union

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS signatures (
    sig TEXT PRIMARY KEY,
    description TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS captions (
    image_key TEXT NOT NULL,
    sig TEXT NOT NULL,
    caption TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (image_key, sig)
)
"""


def default_store_path() -> Path:
    """Where captions are kept when the component names no store: the user's cache
    folder (``$SPACY_AGBAN_CACHE``, else ``$XDG_CACHE_HOME/spacy_agban``, else
    ``~/.cache/spacy_agban``), like the Hugging Face cache of the weights."""
    root = os.environ.get("SPACY_AGBAN_CACHE")
    if root:
        return Path(root).expanduser() / "captions.sqlite"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "spacy_agban" / "captions.sqlite"


class CaptionStore:
    """Captions on disk, keyed by image content and captioner signature."""

    def __init__(self, path: Union[str, Path], timeout: float = 60.0):
        self.path = Path(path).expanduser()
        self.timeout = timeout
        self._local = threading.local()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._setup(self._connection())

    def __getstate__(self) -> Dict[str, object]:
        # Connections never travel (pickled for a spawned process or a Ray actor): reopen there.
        return {"path": self.path, "timeout": self.timeout}

    def __setstate__(self, state: Dict[str, object]) -> None:
        self.path = state["path"]  # type: ignore[assignment]
        self.timeout = state["timeout"]  # type: ignore[assignment]
        self._local = threading.local()

    def _connection(self) -> sqlite3.Connection:
        # A connection must not cross a fork or a thread: one per (pid, thread).
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            conn = sqlite3.connect(str(self.path), timeout=self.timeout, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            self._local.conn = conn
            self._local.pid = os.getpid()
        return conn

    def _setup(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise ValueError(f"caption store {self.path} has schema version {version}; "
                             f"this code reads version {SCHEMA_VERSION}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local = threading.local()

    def register_signature(self, sig: str, description: Dict[str, object]) -> None:
        self._write("INSERT OR IGNORE INTO signatures (sig, description) VALUES (?, ?)",
                    [(sig, json.dumps(description, sort_keys=True))])

    def signatures(self) -> Dict[str, Dict[str, object]]:
        rows = self._connection().execute("SELECT sig, description FROM signatures").fetchall()
        return {sig: json.loads(desc) for sig, desc in rows}

    def get_many(self, image_keys: Iterable[str], sig: str) -> Dict[str, str]:
        keys = list(dict.fromkeys(image_keys))
        found: Dict[str, str] = {}
        conn = self._connection()
        for start in range(0, len(keys), 500):  # stay under SQLite's variable limit
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(
                f"SELECT image_key, caption FROM captions WHERE sig = ? AND image_key IN ({marks})",
                (sig, *chunk),
            ).fetchall()
            found.update((key, caption) for key, caption in rows if isinstance(caption, str))
        return found

    def put_many(self, entries: Sequence[Tuple[str, str]], sig: str) -> None:
        """Write a batch in one transaction: all of it lands, or none of it."""
        now = time.time()
        self._write("INSERT OR REPLACE INTO captions (image_key, sig, caption, created) VALUES (?, ?, ?, ?)",
                    [(key, sig, caption, now) for key, caption in entries])

    def keys(self, sig: str) -> Iterator[str]:
        """The image keys of this captioner signature (``features export`` reads them)."""
        for (key,) in self._connection().execute("SELECT image_key FROM captions WHERE sig = ?", (sig,)):
            yield key

    def count(self, sig: Optional[str] = None) -> int:
        conn = self._connection()
        if sig is None:
            return conn.execute("SELECT COUNT(*) FROM captions").fetchone()[0]
        return conn.execute("SELECT COUNT(*) FROM captions WHERE sig = ?", (sig,)).fetchone()[0]

    def _write(self, statement: str, rows: Sequence[Tuple[object, ...]]) -> None:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(statement, rows)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
