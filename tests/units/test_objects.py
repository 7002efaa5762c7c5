"""ObjectUnits: store first, detector on misses, bad images never stop a batch."""
import shutil
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import numpy
import pytest
import spacy
import torch
from PIL import Image
from spacy.tokens import Doc, DocBin
from spacy.util import registry
from thinc.api import Config

from spacy_agban.cli.detect import detect_command
from spacy_agban.detection.detector import RandomWeightsWarning, make_fasterrcnn_mobilenet_detector, make_mask_rcnn_detector, signature_key
from spacy_agban.detection.images import ImageLoader, ImageWarning
from spacy_agban.units.objects import ObjectUnits
from spacy_agban.detection.store import Detections, FeatureStore
from spacy_agban.units.base import OBJECT, VisualUnit

IMAGES = Path(__file__).resolve().parents[2] / "assets" / "twitter2015" / "images"
SMALL = dict(weights=None, score_threshold=0.0, min_size=128, max_size=160, device="cpu", proposals=100)


class FakeDetector:
    """The detector interface, fast and exact: features are a function of the pixels."""

    def __init__(self, top_k: int = 3, max_size: int = 160, batch_size: int = 2, tag: str = "a",
                 fail_color: Optional[tuple] = None):
        self.top_k, self.max_size, self.batch_size, self.tag = top_k, max_size, batch_size, tag
        self.fail_color = fail_color
        self.calls: List[int] = []

    def signature(self) -> Dict[str, object]:
        return {"model": "fake", "tag": self.tag, "top_k": self.top_k, "max_size": self.max_size}

    def signature_key(self) -> str:
        return signature_key(self.signature())

    def __call__(self, images: List[Image.Image]) -> List[Detections]:
        self.calls.append(len(images))
        results = []
        for image in images:
            if self.fail_color is not None and image.getpixel((0, 0)) == self.fail_color:
                raise RuntimeError("detector exploded")
            mean = numpy.asarray(image, dtype="float32").mean(axis=(0, 1)) / 255  # r, g, b
            k = self.top_k
            features = numpy.resize(mean, (k, 1024)) + 0.1 * numpy.arange(k, dtype="float32")[:, None]
            width, height = image.size
            boxes = numpy.array([[0, 0, width / (i + 1), height / (i + 1)] for i in range(k)], dtype="float32")
            results.append(Detections(features, [f"obj{i}" for i in range(k)],
                                      numpy.linspace(0.9, 0.5, k, dtype="float32"), boxes))
        return results


def colored(root: Path, name: str, color=(200, 30, 30), size=(64, 48)) -> str:
    Image.new("RGB", size, color).save(root / name)
    return name


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    return folder


@pytest.fixture
def nlp():
    return spacy.blank("en")


def make_docs(nlp, images: list) -> List[Doc]:
    docs = []
    for i, image in enumerate(images):
        doc = nlp.make_doc(f"post number {i}")
        doc._.image = image
        docs.append(doc)
    return docs


def as_tuples(units: List[List[VisualUnit]]):
    return [[(u.source, u.label, u.score, u.box, u.vector.tobytes()) for u in doc_units] for doc_units in units]


def test_units_have_the_interface_shape(root: Path, nlp) -> None:
    source = ObjectUnits(detector=FakeDetector(), image_root=root, top_k=2)
    (units,) = source(make_docs(nlp, [colored(root, "a.png")]))
    assert len(units) == 2
    for unit in units:
        assert unit.source == OBJECT and unit.vector.shape == (1024,) and unit.vector.dtype == numpy.float32
        assert isinstance(unit.score, float) and len(unit.box) == 4 and unit.label.startswith("obj")


def test_docs_without_image_get_nothing_silently(root: Path, nlp) -> None:
    detector = FakeDetector()
    source = ObjectUnits(detector=detector, image_root=root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert source(make_docs(nlp, [None, None])) == [[], []]
    assert detector.calls == []


def test_bad_images_are_named_and_skipped(root: Path, nlp, monkeypatch) -> None:
    monkeypatch.setattr(ImageLoader, "opener", staticmethod(lambda *a: pytest.fail("network used")))
    good = colored(root, "good.png")
    (root / "empty.jpg").write_bytes(b"")
    (root / "junk.jpg").write_bytes(b"not an image at all")
    Image.new("L", (5000, 5000)).save(root / "bomb.png")
    (root.parent / "secret.png").write_bytes((root / good).read_bytes())
    bad = ["missing.jpg", "empty.jpg", "junk.jpg", "bomb.png", "../secret.png", "http://example.com/x.jpg", 42]
    source = ObjectUnits(detector=FakeDetector(), image_root=root, max_pixels=10_000_000)
    with pytest.warns(ImageWarning) as record:
        units = source(make_docs(nlp, [good] + bad + [good]))
    assert len(units[0]) == 3 and as_tuples([units[0]]) == as_tuples([units[-1]])
    assert all(u == [] for u in units[1:-1])
    messages = " ".join(str(w.message) for w in record)
    for name in bad:
        assert repr(str(name)) in messages or str(name) in messages
    assert "falls back to its caption or its text" in messages


def test_detector_failure_costs_only_that_image(root: Path, nlp) -> None:
    detector = FakeDetector(fail_color=(0, 0, 255), batch_size=4)
    names = [colored(root, "a.png"), colored(root, "boom.png", (0, 0, 255)), colored(root, "c.png", (9, 9, 9))]
    source = ObjectUnits(detector=detector, image_root=root)
    with pytest.warns(ImageWarning, match="boom.png.*detector exploded"):
        units = source(make_docs(nlp, names))
    assert [len(u) for u in units] == [3, 0, 3]


def test_warnings_are_capped(root: Path, nlp) -> None:
    source = ObjectUnits(detector=FakeDetector(), image_root=root, max_warnings=3)
    with pytest.warns(ImageWarning) as record:
        source(make_docs(nlp, [f"gone{i}.jpg" for i in range(20)]))
        source(make_docs(nlp, [f"gone{i}.jpg" for i in range(20)]))  # the same images again: quiet
    assert len(record) == 4 and "further images are skipped" in str(record[-1].message)
    assert source.n_warnings == 20


def test_max_warnings_set_after_construction_silences_the_warnings(root: Path, nlp) -> None:
    """The batch engines set ``max_warnings = 0`` on the pipeline's units (a bad image
    is an error row there): the limit must apply, not only the constructor's."""
    source = ObjectUnits(detector=FakeDetector(), image_root=root)
    source.max_warnings = 0
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        source(make_docs(nlp, ["gone0.jpg", "gone1.jpg"]))
    assert not [w for w in record if issubclass(w.category, ImageWarning)]
    assert source.n_warnings == 2 and source.max_warnings == 0


def test_lookup_by_key_reads_the_feature_reader_then_the_store_then_detects(root: Path, tmp_path: Path) -> None:
    from spacy_agban.detection.images import ImageSource
    from spacy_agban.units.objects import KeyedImage

    names = [colored(root, f"{i}.png", (i * 40, 10, 10)) for i in range(3)]
    sources = [ImageSource(name=n, data=(root / n).read_bytes()) for n in names]
    keyed = [KeyedImage(s.content_key(), n, s) for s, n in zip(sources, names)]
    detector = FakeDetector()
    store = FeatureStore(tmp_path / "s.sqlite")
    det = FakeDetector()([Image.open(root / names[0]).convert("RGB")])[0]
    store.put_many([(keyed[0].key, det)], detector.signature_key())

    class Reader:
        writable = True

        def __init__(self):
            self.rows, self.put = {keyed[1].key: det}, []

        def signatures(self):
            return {detector.signature_key(): {}}

        def get_many(self, keys, sig):
            return {k: self.rows[k] for k in keys if k in self.rows}

        def put_many(self, entries, sig, description=None):
            self.put.extend(k for k, _ in entries)

    reader = Reader()
    units = ObjectUnits(store=store, detector=detector, image_root=root, features=reader)
    found = units.lookup(keyed + [keyed[2]])  # a key twice: one detection
    assert [found[k.key].status for k in keyed] == ["cached", "cached", "detected"]
    assert (units.n_feature_hits, units.n_store_hits, units.n_detector_images) == (1, 1, 1)
    assert reader.put == [keyed[2].key]  # new detections go to the writable reader too
    assert keyed[2].key in store.get_many([keyed[2].key], detector.signature_key())


def test_second_pass_runs_the_detector_zero_times(root: Path, tmp_path: Path, nlp) -> None:
    names = [colored(root, f"{i}.png", (i * 40, 10, 10)) for i in range(5)]
    store = tmp_path / "features.sqlite"
    first = ObjectUnits(store=store, detector=FakeDetector(), image_root=root)
    units = first(make_docs(nlp, names))
    assert first.n_detector_images == 5
    again = ObjectUnits(store=store, detector=FakeDetector(), image_root=root)
    assert as_tuples(again(make_docs(nlp, names))) == as_tuples(units)
    assert again.n_detector_images == 0 and again.n_store_hits == 5
    # Same pixels under another name, or the same file read again: still a hit.
    shutil.copy(root / names[0], root / "copy.png")
    again(make_docs(nlp, ["copy.png", names[1]]))
    assert again.n_detector_images == 0


def test_changed_signature_invalidates(root: Path, tmp_path: Path, nlp) -> None:
    names = [colored(root, "a.png")]
    store = tmp_path / "f.sqlite"
    ObjectUnits(store=store, detector=FakeDetector(tag="a"), image_root=root)(make_docs(nlp, names))
    other = ObjectUnits(store=store, detector=FakeDetector(tag="b"), image_root=root)
    other(make_docs(nlp, names))
    assert other.n_detector_images == 1
    assert len(FeatureStore(store).signatures()) == 2


def test_changed_file_content_is_detected_again(root: Path, tmp_path: Path, nlp) -> None:
    source = ObjectUnits(store=tmp_path / "f.sqlite", detector=FakeDetector(), image_root=root)
    colored(root, "a.png", (1, 2, 3))
    before = source(make_docs(nlp, ["a.png"]))
    colored(root, "a.png", (100, 2, 3), size=(65, 48))
    after = source(make_docs(nlp, ["a.png"]))
    assert source.n_detector_images == 2 and as_tuples(before) != as_tuples(after)


def test_images_shared_by_docs_are_detected_once(root: Path, nlp) -> None:
    detector = FakeDetector(batch_size=8)
    name = colored(root, "a.png")
    source = ObjectUnits(detector=detector, image_root=root)
    units = source(make_docs(nlp, [name, name, Path(root / name), None, name]))
    assert source.n_detector_images == 1 and detector.calls == [1]
    assert [len(u) for u in units] == [3, 3, 3, 0, 3]


def test_batch_equals_one_doc_at_a_time(root: Path, nlp) -> None:
    images = [colored(root, f"{i}.png", (i * 20, 50, 90), size=(40 + i * 7, 30 + i * 3)) for i in range(7)]
    images.append(Image.new("RGB", (20, 20), (1, 200, 3)))  # an in-memory image
    images.insert(3, None)
    batched = ObjectUnits(detector=FakeDetector(batch_size=3), image_root=root)
    single = ObjectUnits(detector=FakeDetector(batch_size=3), image_root=root)
    docs = make_docs(nlp, images)
    together = batched(docs)
    alone = [single([doc])[0] for doc in docs]
    assert as_tuples(together) == as_tuples(alone)
    assert [len(u) for u in together] == [3, 3, 3, 0, 3, 3, 3, 3, 3]


def test_boxes_come_back_in_original_coordinates(root: Path, nlp) -> None:
    colored(root, "big.png", size=(800, 600))
    source = ObjectUnits(detector=FakeDetector(max_size=160), image_root=root)  # loads at 160x120
    (units,) = source(make_docs(nlp, ["big.png"]))
    assert units[0].box == pytest.approx((0, 0, 800, 600))


def test_store_only_source(root: Path, tmp_path: Path, nlp) -> None:
    store = tmp_path / "f.sqlite"
    names = [colored(root, "a.png"), colored(root, "b.png", (5, 5, 5))]
    filled = ObjectUnits(store=store, detector=FakeDetector(), image_root=root)(make_docs(nlp, names[:1]))
    reader = ObjectUnits(store=str(store), detector=None, image_root=root)
    with pytest.warns(ImageWarning, match="no detector is configured") as record:
        units = reader(make_docs(nlp, names))
        reader(make_docs(nlp, names))
    assert len(record) == 1  # once, not per batch
    assert as_tuples(units[:1]) == as_tuples(filled) and units[1] == []


def test_store_only_needs_a_signature_when_ambiguous(root: Path, tmp_path: Path, nlp) -> None:
    store = tmp_path / "f.sqlite"
    name = colored(root, "a.png")
    for tag in ("a", "b"):
        ObjectUnits(store=store, detector=FakeDetector(tag=tag), image_root=root)(make_docs(nlp, [name]))
    with pytest.raises(ValueError, match="2 detector signatures"):
        ObjectUnits(store=store, image_root=root)(make_docs(nlp, [name]))
    key = FakeDetector(tag="b").signature_key()
    (units,) = ObjectUnits(store=store, image_root=root, signature=key)(make_docs(nlp, [name]))
    assert len(units) == 3
    with pytest.raises(ValueError, match="needs a feature store, a detector"):
        ObjectUnits()


def test_empty_store_without_detector_falls_back_with_one_warning(root: Path, tmp_path: Path, nlp) -> None:
    FeatureStore(tmp_path / "f.sqlite").close()  # created by a writer, never filled
    source = ObjectUnits(store=tmp_path / "f.sqlite", image_root=root)
    with pytest.warns(ImageWarning, match="no detector is configured") as record:
        assert source(make_docs(nlp, [colored(root, "a.png"), None])) == [[], []]
        source(make_docs(nlp, ["a.png"]))
    assert len(record) == 1


def test_a_missing_store_is_an_error_not_created(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # run from another folder: the relative path points nowhere
    missing = f"'stores/objects.sqlite' not found \\(looked for {tmp_path}/stores/objects.sqlite"
    # A path is checked once a saved pipeline has resolved it (check_store, at load), and
    # in any case before the first lookup.
    absolute = ObjectUnits(store=tmp_path / "objects.sqlite", image_root=tmp_path)
    with pytest.raises(FileNotFoundError, match=f"'{tmp_path}/objects.sqlite' not found"):
        absolute.check_store()
    source = ObjectUnits(store="stores/objects.sqlite", image_root=tmp_path)
    with pytest.raises(FileNotFoundError, match=missing):
        source.check_store()
    with pytest.raises(FileNotFoundError, match=missing):
        source(make_docs(spacy.blank("en"), [colored(tmp_path, "a.png")]))
    with pytest.raises(FileNotFoundError, match="not found"):
        FeatureStore(tmp_path / "stores" / "objects.sqlite", create=False)
    assert not (tmp_path / "stores").exists()
    # Through a config, as spacy.load builds it.
    config = Config().from_str("""
    [units]
    @misc = "spacy_agban.ObjectUnits.v1"
    store = "stores/objects.sqlite"
    """)
    with pytest.raises(FileNotFoundError, match="stores/objects.sqlite"):
        registry.resolve(config)["units"].check_store()
    assert not (tmp_path / "stores").exists()
    # A writer (a source with a detector, the detect command) still creates it.
    assert ObjectUnits(store="stores/objects.sqlite", detector=FakeDetector()).store is not None
    assert ObjectUnits(store="stores/objects.sqlite").store.count() == 0


def test_without_detector_bad_images_are_named(root: Path, tmp_path: Path, nlp) -> None:
    import struct
    import zlib

    store = tmp_path / "f.sqlite"
    stored = colored(root, "stored.png")
    ObjectUnits(store=store, detector=FakeDetector(), image_root=root).detections_for([stored])
    unstored = colored(root, "unstored.png", (1, 2, 3))
    Image.new("RGB", (64, 48), (9, 9, 9)).save(root / "full.jpg")
    (root / "truncated.jpg").write_bytes((root / "full.jpg").read_bytes()[:300])
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    (root / "text.jpg").write_text("this is a text file renamed .jpg")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)  # a 20000x20000 RGB PNG header
    (root / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    bad = ["truncated.jpg", "corrupt.jpg", "text.jpg", "huge.png"]
    source = ObjectUnits(store=store, image_root=root)
    with pytest.warns(ImageWarning) as record:
        units = source(make_docs(nlp, [stored, unstored] + bad))
        source(make_docs(nlp, [stored, unstored] + bad))  # the same images again: quiet
    assert len(units[0]) == 3 and all(u == [] for u in units[1:])
    messages = [str(w.message) for w in record]
    for name in bad:
        assert len([m for m in messages if f"Skipping image {name!r}" in m]) == 1
    assert "decompression bomb" in " ".join(messages)
    (no_detector,) = [m for m in messages if "no detector is configured" in m]
    assert no_detector.startswith("1 image(s) are not in the feature store")  # only the good one
    assert len(messages) == len(bad) + 1


def test_images_past_the_warning_limit_are_counted_and_logged(root: Path, nlp, caplog) -> None:
    source = ObjectUnits(detector=FakeDetector(), image_root=root, max_warnings=2)
    big = Image.new("RGB", (300, 300))
    with pytest.warns(ImageWarning) as record:
        source(make_docs(nlp, [f"gone{i}.jpg" for i in range(5)]))
    assert len(record) == 3 and "5 in all so far" in caplog.text and "3 more images" in caplog.text
    caplog.clear()
    source.loader.max_pixels = 50_000  # an in-memory image is refused by its size too
    source(make_docs(nlp, [big, "gone0.jpg"]))
    assert "1 more images could not be used" in caplog.text and "(6 in all so far)" in caplog.text
    assert source.n_warnings == 6


def test_built_from_a_config(tmp_path: Path) -> None:
    config = Config().from_str(f"""
    [units]
    @misc = "spacy_agban.ObjectUnits.v1"
    store = "{tmp_path / 'f.sqlite'}"
    image_root = null
    top_k = 2

    [units.detector]
    @misc = "spacy_agban.FasterRCNNMobileNetDetector.v1"
    weights = null
    top_k = 3
    score_threshold = 0.0
    min_size = 128
    max_size = 160
    device = "cpu"
    """)
    with pytest.warns(RandomWeightsWarning):
        units = registry.resolve(config)["units"]
    assert isinstance(units, ObjectUnits) and units.top_k == 2 and units.detector.max_size == 160


@pytest.fixture(scope="module")
def maskrcnn():
    torch.manual_seed(0)
    with pytest.warns(RandomWeightsWarning):
        return make_mask_rcnn_detector(top_k=3, batch_size=4, **SMALL)


def test_real_detector_batch_equals_single(maskrcnn, nlp) -> None:
    # 106 and 113 share an input shape, so they form one detector batch; batched
    # convolutions differ from single ones only by float rounding.
    names = ["106.jpg", None, "113.jpg", "102.jpg"]
    batched = ObjectUnits(detector=maskrcnn, image_root=IMAGES)(make_docs(nlp, names))
    single_source = ObjectUnits(detector=maskrcnn, image_root=IMAGES)
    single = [single_source(make_docs(nlp, [n]))[0] for n in names]
    assert [len(u) for u in batched] == [3, 0, 3, 3]
    for a_units, b_units in zip(batched, single):
        assert [u.label for u in a_units] == [u.label for u in b_units]
        for a, b in zip(a_units, b_units):
            numpy.testing.assert_allclose(a.vector, b.vector, rtol=1e-3, atol=1e-3)
            numpy.testing.assert_allclose(a.box, b.box, rtol=1e-4, atol=0.05)  # original pixels


def test_fifteen_real_images_end_to_end(tmp_path: Path, nlp) -> None:
    names = sorted(p.name for p in IMAGES.glob("*.jpg"))
    assert len(names) == 15
    torch.manual_seed(0)
    with pytest.warns(RandomWeightsWarning):
        detector = make_fasterrcnn_mobilenet_detector(top_k=3, batch_size=4, **SMALL)
    store = tmp_path / "f.sqlite"
    source = ObjectUnits(store=store, detector=detector, image_root=IMAGES)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImageWarning)
        units = source(make_docs(nlp, names))
    assert source.n_detector_images == 15
    assert all(len(u) == 3 and u[0].vector.shape == (1024,) for u in units)
    for name, doc_units in zip(names, units):
        width, height = Image.open(IMAGES / name).size
        for unit in doc_units:
            x0, y0, x1, y1 = unit.box
            assert 0 <= x0 <= x1 <= width + 1e-3 and 0 <= y0 <= y1 <= height + 1e-3
    again = ObjectUnits(store=store, detector=detector, image_root=IMAGES)
    assert as_tuples(again(make_docs(nlp, names))) == as_tuples(units)
    assert again.n_detector_images == 0


# -- the detect command -------------------------------------------------------


def test_detect_command_on_a_folder_is_resumable(tmp_path: Path, root: Path, capsys) -> None:
    for name in ("102.jpg", "106.jpg"):
        shutil.copy(IMAGES / name, root / name)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    args = dict(image_root=None, detector="mobilenet", weights="random", min_size=128, max_size=160,
                top_k=3, batch_size=2, score_threshold=0.0, device="cpu", limit=None, allow_remote=False)
    store = tmp_path / "f.sqlite"
    torch.manual_seed(0)  # the same random weights (hence signature) in both runs
    with pytest.warns(RandomWeightsWarning):
        first = detect_command(root, store, **args)
    assert (first["detected"], first["cached"], first["failed"]) == (2, 0, 1)
    assert "broken.jpg" in capsys.readouterr().out
    torch.manual_seed(0)
    with pytest.warns(RandomWeightsWarning):
        second = detect_command(root, store, **args)
    assert (second["detected"], second["cached"], second["failed"]) == (0, 2, 1)
    (failure,) = [f for sig in FeatureStore(store).signatures() for f in FeatureStore(store).failures(sig)]
    assert failure.name == "broken.jpg" and failure.attempts == 2


def detect_docbin(tmp_path: Path, root: Path, docs) -> dict:
    """``detect`` over a DocBin of ``docs`` with a small random detector; its summary."""
    DocBin(docs=docs, store_user_data=True).to_disk(tmp_path / "train.spacy")
    with pytest.warns(RandomWeightsWarning):
        return detect_command(
            tmp_path / "train.spacy", tmp_path / "f.sqlite", image_root=root, detector="mobilenet",
            weights="random", min_size=128, max_size=160, top_k=3, batch_size=2, score_threshold=0.0,
            device="cpu", limit=None, allow_remote=False,
        )


def test_detect_command_on_a_docbin(tmp_path: Path, root: Path, nlp) -> None:
    shutil.copy(IMAGES / "102.jpg", root / "102.jpg")
    docs = make_docs(nlp, ["102.jpg", "999.jpg", None, "102.jpg"])
    summary = detect_docbin(tmp_path, root, docs)
    assert (summary["images"], summary["detected"], summary["missing"]) == (2, 1, 1)


def test_detect_command_without_images_exits_cleanly(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    summary = detect_command(folder, tmp_path / "f.sqlite", image_root=None, detector="maskrcnn",
                             weights="random", min_size=128, max_size=None, top_k=3, batch_size=1,
                             score_threshold=0.0, device="cpu", limit=None, allow_remote=False)
    assert summary["images"] == 0
    out = capsys.readouterr().out
    assert str(folder) in out and "captions/text" in out
    assert not (tmp_path / "f.sqlite").exists()  # nothing built, nothing written


def test_detect_command_on_a_missing_folder_fails(tmp_path: Path, capsys) -> None:
    import typer

    with pytest.raises(typer.Exit) as info:
        detect_command(tmp_path / "nope", tmp_path / "f.sqlite", image_root=None, detector="maskrcnn",
                       weights="random", min_size=128, max_size=None, top_k=3, batch_size=1,
                       score_threshold=0.0, device="cpu", limit=None, allow_remote=False)
    assert info.value.exit_code == 1
    assert f"image folder {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "f.sqlite").exists()


# -- object units inside the agban pipe ------------------------------------------------

TINY_MODEL = {"hidden": 16, "gban_dim": 8, "gate_dim": 8, "discriminator_hidden": 8,
              "char_dim": 8, "char_hidden": 8, "word_dim": 8, "dropout": 0.0}
# The same text with different images has different entity types: only a model that
# uses the object units can fit all of them.
IMAGE_POSTS = [
    ("Kolo is here", "red.png", [(0, 4, "MISC")]),
    ("Kolo is here", "blue.png", [(0, 4, "PER")]),
    ("I love Paris", "red.png", [(7, 12, "LOC")]),
    ("Visiting Apple today", "blue.png", [(9, 14, "ORG")]),
]


def test_object_units_in_the_pipe_call_pipe_and_reload(tmp_path: Path, root: Path) -> None:
    """Plumbing only (no training): the pipe reads stored object units through the
    config, records them on the doc, and gives the same result piped, called and
    reloaded, without a detector."""
    pytest.importorskip("spacy_agban.pipeline")
    from spacy.training import Example

    colored(root, "red.png", (255, 0, 0))
    colored(root, "blue.png", (0, 0, 255))
    store = tmp_path / "f.sqlite"
    filler = ObjectUnits(store=store, detector=FakeDetector(), image_root=root)
    filler.detections_for(["red.png", "blue.png"])
    units_config = {"@misc": "spacy_agban.ObjectUnits.v1", "store": str(store),
                    "image_root": str(root), "signature": filler.signature}
    nlp = spacy.blank("en")
    nlp.add_pipe("agban", config={"model": {**TINY_MODEL, "fusion": "gban", "adversarial": True},
                                  "caption_units": None, "object_units": units_config})

    def docs_of(pipeline, with_images: bool = True) -> List[Doc]:
        docs = []
        for text, image, _ in IMAGE_POSTS:
            doc = pipeline.make_doc(text)
            doc._.image = image if with_images else None
            docs.append(doc)
        return docs

    examples = [Example.from_dict(doc, {"entities": ents}) for doc, (_, _, ents) in zip(docs_of(nlp), IMAGE_POSTS)]
    nlp.initialize(lambda: examples)

    def tags(docs) -> list:
        return [[(t.ent_iob_, t.ent_type_) for t in doc] for doc in docs]

    called = [nlp(doc) for doc in docs_of(nlp)]
    piped = list(nlp.pipe(docs_of(nlp), batch_size=3))
    assert tags(called) == tags(piped)
    assert [u["source"] for u in called[0]._.visual_units] == [OBJECT] * 3
    assert called[0]._.visual_units[0]["box"] == [0.0, 0.0, 64.0, 48.0]
    without = [nlp(doc) for doc in docs_of(nlp, with_images=False)]
    assert all(doc._.visual_units == [] for doc in without)
    nlp.to_disk(tmp_path / "model")
    reloaded = spacy.load(tmp_path / "model")
    assert tags(reloaded(doc) for doc in docs_of(reloaded)) == tags(called)
    assert reloaded.get_pipe("agban").object_units.n_detector_images == 0


def test_a_saved_pipeline_reads_only_its_detectors_features(tmp_path: Path, root: Path) -> None:
    """The detector signature the model was trained with is saved with it: a store that
    later holds another detector's features as well, or only those, changes nothing
    silently."""
    from spacy.training import Example

    colored(root, "red.png", (255, 0, 0))
    colored(root, "blue.png", (0, 0, 255))
    store = tmp_path / "f.sqlite"
    filler = ObjectUnits(store=store, detector=FakeDetector(tag="a"), image_root=root)
    filler.detections_for(["red.png", "blue.png"])
    trained_sig = filler.signature
    units_config = {"@misc": "spacy_agban.ObjectUnits.v1", "store": str(store), "image_root": str(root)}
    nlp = spacy.blank("en")
    nlp.add_pipe("agban", config={"model": {**TINY_MODEL, "fusion": "gban", "adversarial": True},
                                  "caption_units": None, "object_units": units_config})

    def docs_of(pipeline) -> List[Doc]:
        docs = []
        for text, image, _ in IMAGE_POSTS:
            doc = pipeline.make_doc(text)
            doc._.image = image
            docs.append(doc)
        return docs

    examples = [Example.from_dict(doc, {"entities": ents}) for doc, (_, _, ents) in zip(docs_of(nlp), IMAGE_POSTS)]
    nlp.initialize(lambda: examples)  # the store holds one signature: that one is used
    assert nlp.get_pipe("agban").cfg["object_signature"] == trained_sig
    expected = [d._.visual_units for d in nlp.pipe(docs_of(nlp))]
    nlp.to_disk(tmp_path / "model")

    # Another detector's features for the same images join the store.
    other = FakeDetector(tag="b")
    other_store = FeatureStore(store)
    other_store.register_signature(other.signature_key(), other.signature())
    entries = [(key, Detections(numpy.full((3, 1024), 7.0, "float32"), ["x", "y", "z"],
                                numpy.ones(3, "float32"), numpy.zeros((3, 4), "float32")))
               for key in other_store.keys(trained_sig)]
    other_store.put_many(entries, other.signature_key())
    reloaded = spacy.load(tmp_path / "model")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImageWarning)
        assert [d._.visual_units for d in reloaded.pipe(docs_of(reloaded))] == expected

    # Only the other detector's features: said once, not used.
    with other_store._transaction() as conn:
        conn.execute("DELETE FROM detections WHERE sig = ?", (trained_sig,))
        conn.execute("DELETE FROM signatures WHERE sig = ?", (trained_sig,))
    reloaded = spacy.load(tmp_path / "model")
    with pytest.warns(ImageWarning, match=f"holds no object features of detector signature '{trained_sig}'") as record:
        got = [d._.visual_units for d in reloaded.pipe(docs_of(reloaded), batch_size=2)]
    assert got == [[]] * len(IMAGE_POSTS) and len(record) == 1
    # A detector configured unlike the one trained with is refused at load time.
    with pytest.raises(ValueError, match="trained on object features of detector signature"):
        spacy.load(tmp_path / "model", config={"components.agban.object_units.detector": {
            "@misc": "tests.FakeDetector.v1", "tag": "b"}})


@registry.misc("tests.FakeDetector.v1")
def make_fake_detector(tag: str = "a") -> FakeDetector:
    return FakeDetector(tag=tag)


def test_paths_the_os_cannot_resolve_cost_only_their_doc(root: Path, nlp) -> None:
    good = colored(root, "good.png")
    (root / "loop_a").symlink_to(root / "loop_b")
    (root / "loop_b").symlink_to(root / "loop_a")
    bad = ["good.png\x00x", "loop_a", "loop_a/x.jpg"]
    for detector in (FakeDetector(), None):
        store = None if detector else root.parent / "empty.sqlite"
        if store is not None:
            FeatureStore(store).register_signature("s", {})
        source = ObjectUnits(store=store, detector=detector, image_root=root)
        with pytest.warns(ImageWarning) as record:
            units = source(make_docs(nlp, [good] + bad))
        messages = [str(w.message) for w in record if "Skipping image" in str(w.message)]
        assert len(messages) == len(bad)
        for name, message in zip(bad, messages):
            assert repr(name) in message
        if detector is not None:
            assert len(units[0]) == 3 and units[1:] == [[], [], []]


def test_a_damaged_store_entry_is_detected_again(root: Path, tmp_path: Path, nlp) -> None:
    import sqlite3

    names = [colored(root, "a.png"), colored(root, "b.png", (10, 200, 10))]
    store = tmp_path / "f.sqlite"
    first = ObjectUnits(store=store, detector=FakeDetector(), image_root=root)
    units = first(make_docs(nlp, names))
    with sqlite3.connect(store) as conn:
        conn.execute("UPDATE detections SET n = 5 WHERE rowid = (SELECT MIN(rowid) FROM detections)")
    again = ObjectUnits(store=store, detector=FakeDetector(), image_root=root)
    with pytest.warns(UserWarning, match="image key .* is damaged"):
        assert as_tuples(again(make_docs(nlp, names))) == as_tuples(units)
    assert (again.n_detector_images, again.n_store_hits) == (1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new entry replaced the damaged one
        assert as_tuples(again(make_docs(nlp, names))) == as_tuples(units)


def test_a_saved_relative_image_root_finds_the_images_from_any_folder(tmp_path: Path, monkeypatch) -> None:
    from spacy.training import Example

    work, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (work / "images").mkdir(parents=True)
    elsewhere.mkdir()
    monkeypatch.chdir(work)  # as `spacy train` runs in the project folder
    colored(work / "images", "red.png", (255, 0, 0))
    filler = ObjectUnits(store="f.sqlite", detector=FakeDetector(), image_root="images")
    filler.detections_for(["red.png"])
    units_config = {"@misc": "spacy_agban.ObjectUnits.v1", "store": str(work / "f.sqlite"),
                    "image_root": "images", "signature": filler.signature}
    nlp = spacy.blank("en")
    nlp.add_pipe("agban", config={"model": {**TINY_MODEL, "fusion": "gban", "adversarial": True},
                                  "caption_units": None, "object_units": units_config})
    doc = nlp.make_doc("Kolo is here")
    doc._.image = "red.png"
    nlp.initialize(lambda: [Example.from_dict(doc, {"entities": [(0, 4, "PER")]})])
    nlp.to_disk(work / "model")

    monkeypatch.chdir(elsewhere)
    loaded = spacy.load(work / "model")
    assert loaded.get_pipe("agban").object_units.loader.image_root == work / "images"
    post = loaded.make_doc("Kolo is here")
    post._.image = "red.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Skipping image": it was found
        assert [u["source"] for u in loaded(post)._.visual_units] == [OBJECT] * 3
    # an override is the caller's choice, resolved against the folder it is given in
    other = spacy.load(work / "model", config={"components.agban.object_units.image_root": "pictures"})
    assert other.get_pipe("agban").object_units.loader.image_root == elsewhere / "pictures"
    # the batch engines read the block without loading the pipeline: the same folder
    from spacy_agban.tagging.models import object_units_block

    assert object_units_block(str(work / "model"))[1]["image_root"] == str(work / "images")


def test_detect_command_on_a_docbin_with_unresolvable_paths(tmp_path: Path, root: Path, nlp) -> None:
    shutil.copy(IMAGES / "102.jpg", root / "102.jpg")
    (root / "loop_a").symlink_to(root / "loop_b")
    (root / "loop_b").symlink_to(root / "loop_a")
    docs = make_docs(nlp, ["102.jpg", "102.jpg\x00x", "loop_a"])
    summary = detect_docbin(tmp_path, root, docs)
    assert (summary["images"], summary["detected"], summary["failed"]) == (3, 1, 2)
    assert {name for name, _ in summary["failures"]} == {"102.jpg\x00x", "loop_a"}
