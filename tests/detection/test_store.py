"""The SQLite feature store: exact round trips, signatures, transactions, WAL readers."""
import multiprocessing
import sqlite3
import threading
import time
from pathlib import Path

import numpy
import pytest

from spacy_agban.detection.store import Detections, FeatureStore


def random_detections(rng: numpy.random.Generator, n: int = 3, dim: int = 1024) -> Detections:
    return Detections(
        features=rng.standard_normal((n, dim)).astype("float32"),
        labels=[f"label {i} ü" for i in range(n)],
        scores=rng.random(n).astype("float32"),
        boxes=(rng.random((n, 4)) * 500).astype("float32"),
    )


def assert_same(a: Detections, b: Detections) -> None:
    assert a.labels == b.labels
    for x, y in ((a.features, b.features), (a.scores, b.scores), (a.boxes, b.boxes)):
        assert x.dtype == y.dtype == numpy.float32
        assert x.shape == y.shape
        assert x.tobytes() == y.tobytes()  # bit-exact, NaN and -0.0 included


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    rng = numpy.random.default_rng(0)
    det = random_detections(rng)
    det.features[0, 0] = numpy.nan
    det.features[0, 1] = -0.0
    det.features[0, 2] = numpy.float32(1e-45)  # subnormal
    store = FeatureStore(tmp_path / "f.sqlite")
    store.put("img", "sig", det)
    store.close()
    assert_same(FeatureStore(tmp_path / "f.sqlite").get("img", "sig"), det)


def test_empty_detection_is_cached_not_missing(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path / "f.sqlite")
    store.put("img", "sig", Detections.empty(1024))
    got = store.get("img", "sig")
    assert got is not None and len(got) == 0 and got.features.shape == (0, 1024)


def test_signature_separates_entries(tmp_path: Path) -> None:
    rng = numpy.random.default_rng(1)
    store = FeatureStore(tmp_path / "f.sqlite")
    store.put("img", "sig-a", random_detections(rng))
    assert store.get("img", "sig-b") is None
    assert store.get_many(["img", "other"], "sig-a").keys() == {"img"}


def test_get_many_beyond_sqlite_variable_limit(tmp_path: Path) -> None:
    rng = numpy.random.default_rng(2)
    store = FeatureStore(tmp_path / "f.sqlite")
    entries = [(f"k{i}", random_detections(rng, n=1, dim=4)) for i in range(1200)]
    store.put_many(entries, "s")
    assert len(store.get_many([k for k, _ in entries] + ["absent"], "s")) == 1200
    assert store.count("s") == 1200


def test_failed_batch_writes_nothing(tmp_path: Path) -> None:
    rng = numpy.random.default_rng(3)
    store = FeatureStore(tmp_path / "f.sqlite")
    # Make SQLite itself fail on the second row, after the first was inserted.
    store._connection().execute(
        "CREATE TRIGGER no_bad BEFORE INSERT ON detections WHEN NEW.image_key = 'bad' "
        "BEGIN SELECT RAISE(ABORT, 'bad row'); END"
    )
    with pytest.raises(sqlite3.IntegrityError, match="bad row"):
        store.put_many([("good", random_detections(rng)), ("bad", random_detections(rng))], "s")
    assert store.count() == 0  # the whole batch rolled back
    store.put_many([("good", random_detections(rng))], "s")  # and the store still works
    assert store.count() == 1


def _writer(path: str, n: int, started) -> None:  # runs in a child process
    store = FeatureStore(path)
    rng = numpy.random.default_rng(4)
    started.set()
    for i in range(n):
        store.put_many([(f"k{i}-{j}", random_detections(rng, 2, 64)) for j in range(5)], "s")


def test_killed_writer_leaves_only_whole_entries(tmp_path: Path) -> None:
    path = str(tmp_path / "f.sqlite")
    FeatureStore(path)
    ctx = multiprocessing.get_context("fork")
    started = ctx.Event()
    proc = ctx.Process(target=_writer, args=(path, 100000, started))
    proc.start()
    started.wait(30)
    store = FeatureStore(path)
    deadline = time.monotonic() + 60
    while store.count() < 50 and time.monotonic() < deadline:
        time.sleep(0.001)
    proc.kill()  # SIGKILL, mid-run
    proc.join()
    count = store.count("s")
    assert count > 0 and count % 5 == 0  # whole batches only
    for key in store.keys("s"):
        det = store.get(key, "s")
        assert det is not None and det.features.shape == (2, 64)
    assert store._connection().execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_concurrent_reader_while_writing(tmp_path: Path) -> None:
    path = tmp_path / "f.sqlite"
    rng = numpy.random.default_rng(5)
    store = FeatureStore(path)
    first = random_detections(rng)
    store.put("first", "s", first)
    assert store._connection().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    errors: list = []
    stop = threading.Event()

    def read() -> None:
        reader = FeatureStore(path)  # its own connection (per thread)
        try:
            while not stop.is_set():
                assert_same(reader.get("first", "s"), first)
                n = reader.count("s")
                assert n >= 1
        except Exception as err:  # reported to the main thread
            errors.append(err)

    threads = [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(40):
        store.put_many([(f"k{i}-{j}", random_detections(rng, 3, 1024)) for j in range(4)], "s")
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert store.count("s") == 1 + 160


def test_reader_never_sees_an_open_transaction(tmp_path: Path) -> None:
    path = tmp_path / "f.sqlite"
    store = FeatureStore(path)
    writer = sqlite3.connect(str(path), isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute(
        "INSERT INTO detections VALUES ('half', 's', 1, 1, x'00000000', '[\"a\"]', x'00000000', x'', 0)"
    )
    assert store.get("half", "s") is None  # uncommitted: invisible, and no lock error
    writer.execute("ROLLBACK")
    assert store.get("half", "s") is None


def test_failures_are_logged_not_cached(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path / "f.sqlite")
    store.record_failures([("a.jpg", "corrupt", "cannot decode")], "s")
    store.record_failures([("a.jpg", "corrupt", "cannot decode")], "s")
    (failure,) = store.failures("s")
    assert (failure.name, failure.kind, failure.attempts) == ("a.jpg", "corrupt", 2)
    assert store.count() == 0
    store.clear_failures(["a.jpg"], "s")
    assert store.failures("s") == []


def test_signatures_are_described(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path / "f.sqlite")
    store.register_signature("abc", {"model": "m", "top_k": 3})
    assert FeatureStore(tmp_path / "f.sqlite").signatures() == {"abc": {"model": "m", "top_k": 3}}


def test_unknown_schema_version_refused(tmp_path: Path) -> None:
    path = tmp_path / "f.sqlite"
    sqlite3.connect(str(path)).execute("PRAGMA user_version = 99")
    with pytest.raises(ValueError, match="schema version 99"):
        FeatureStore(path)


def test_detections_validate_shapes() -> None:
    with pytest.raises(ValueError):
        Detections(numpy.zeros((2, 8)), ["a"], numpy.zeros(2), numpy.zeros((2, 4)))


def test_store_copies_without_its_connection(tmp_path: Path) -> None:
    """Worker processes and deep copies get a fresh SQLite connection (__getstate__)."""
    import copy as copying

    store = FeatureStore(tmp_path / "f.sqlite")
    store.put("k", "s", random_detections(numpy.random.default_rng(6), 1, 8))
    copy = copying.deepcopy(store)
    assert copy.get("k", "s") is not None


@pytest.mark.parametrize("change", [
    "n = 5",                       # the count no longer matches the feature bytes
    "labels = 'not json ['",       # labels that are not JSON
    "labels = '{\"a\": 1}'",       # JSON, not a list
    "labels = '[1, 2, 3]'",        # a list, not of strings
    "labels = '\"abc\"'",          # a string whose length happens to match n
])
def test_a_damaged_entry_is_a_miss_with_a_warning_naming_it(tmp_path: Path, change: str) -> None:
    rng = numpy.random.default_rng(0)
    store = FeatureStore(tmp_path / "f.sqlite")
    good, bad = random_detections(rng), random_detections(rng)
    store.put_many([("good", good), ("bad", bad)], "sig")
    with sqlite3.connect(tmp_path / "f.sqlite") as conn:
        conn.execute(f"UPDATE detections SET {change} WHERE image_key = 'bad'")
    with pytest.warns(UserWarning, match="'bad'.*damaged") as record:
        found = store.get_many(["good", "bad"], "sig")
    assert len(record) == 1 and list(found) == ["good"]
    assert_same(found["good"], good)
    store.put("bad", "sig", bad)  # detected again: the new entry replaces the damaged one
    assert_same(store.get("bad", "sig"), bad)



_CLOSING_WRITER = """
import sys
import numpy
from spacy_agban.detection.store import Detections, FeatureStore
store = FeatureStore(sys.argv[1])
rng = numpy.random.default_rng(1)
for i in range(20):
    store.put(f"w{i}", "sig", Detections(rng.random((1, 8), dtype="float32"), ["x"],
                                         numpy.ones(1, "float32"), numpy.zeros((1, 4), "float32")))
store.close()
"""


def test_opening_a_store_again_keeps_the_locks_of_this_process_s_connections(tmp_path: Path) -> None:
    # A second store object on a file this process already has open (a worker's pipeline and
    # a command's reader, a test and the pipeline it tests) must not drop the first
    # connection's locks: another process closing its connection would take itself for the
    # last one and delete the WAL under the first, and every later open of that file in
    # this process would fail with "disk I/O error" (SQLITE_IOERR_SHORT_READ).
    import subprocess
    import sys

    path = tmp_path / "objects.sqlite"
    first = FeatureStore(path)
    first.put("a", "sig", random_detections(numpy.random.default_rng(0), n=2))
    FeatureStore(path).count()  # the check of a second opening
    subprocess.run([sys.executable, "-c", _CLOSING_WRITER, str(path)], check=True)
    assert Path(str(path) + "-wal").exists(), "the other process took itself for the last connection"
    assert first.count() == 21 and FeatureStore(path).count() == 21


def test_a_file_that_is_not_a_database_is_named_so(tmp_path: Path) -> None:
    from spacy_agban.detection.store import NotAFeatureStore

    path = tmp_path / "objects.sqlite"
    path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 8)  # a zip file, say
    with pytest.raises(NotAFeatureStore, match=r"\(not an SQLite database\)"):
        FeatureStore(path)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["objects.sqlite"]
