"""The per-batch steps of bulk tagging, on plain columns, shared by every engine.

A batch is a ``dict`` of equal-length Python lists (column name -> values):
what Ray Data hands an actor after ``table.to_pydict()`` and what the local
engine builds from its input. No ``Language`` or ``Doc`` ever leaves a step.

1. :func:`parse_records` / :func:`parse_lines`: raw records -> ``id``, ``text``,
   ``image``, ``caption`` and ``errors`` (a malformed record becomes a row with
   an error, never a dropped post).
2. :func:`load_images`: read each image's bytes (path rules of
   :class:`~spacy_agban.detection.images.ImageLoader`, URLs and object-store
   URIs only when allowed) -> ``image_key`` (sha256 of the bytes, the feature
   store's key) and ``image_bytes``.
3. :func:`detect`: store first, detector on the misses (the pipeline's own
   :class:`~spacy_agban.units.objects.ObjectUnits`) -> ``obj_*``
   columns (features as raw float32 bytes, labels, scores, boxes).
4. :func:`tag`: ``nlp.pipe`` with those object units -> one output row per post:
   ``id``, ``entities``, ``visual_units``, ``image_key``, ``image_status``,
   ``error``, ``error_kinds``.

Each step catches failures per row: a bad image or caption costs that post its
image or caption (it is still tagged from the rest) and adds an error to it.
"""
import contextlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy

from ..detection.images import ImageLoader, ImageLoadError, ImageSource, KeyedImage
from ..detection.store import Detections
from ..units.base import ObjectUnitSource

Batch = Dict[str, List[Any]]

#: Columns after parsing (the input of every engine's first step).
POST_COLUMNS = ("id", "text", "image", "caption", "errors")
#: Object columns between detect and tag.
OBJECT_COLUMNS = ("image_status", "obj_features", "obj_labels", "obj_scores", "obj_boxes")
#: The output row.
OUTPUT_COLUMNS = ("id", "entities", "visual_units", "image_key", "image_status", "error", "error_kinds")

#: Error kinds (the part of an ``errors`` entry before the colon).
BAD_INPUT = "bad_input"
BAD_CAPTION = "bad_caption"
DETECTOR = "detector"
#: Reading an image's stored features failed (a damaged store row or dataset file).
OBJECTS = "objects"
#: The features dataset could not be read for an image (a damaged file): its objects
#: were looked up in the pipeline's own store and detector instead (its caption: in
#: the captioner's store and model).
FEATURES = "features"
TAG = "tag"
#: Image failures are ``image_<ImageLoadError.kind>``: image_missing, image_corrupt, ...
IMAGE_PREFIX = "image_"

#: A longer caption is refused (alt text is at most a few thousand characters).
MAX_CAPTION_CHARS = 10_000
#: URI schemes read through pyarrow's filesystems (object stores, HDFS).
OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "az")
#: Where spaCy keeps the object units handed to the pipe for one doc.
_OBJECTS_KEY = "spacy_agban.tagging.objects"


@dataclass(frozen=True)
class PostColumns:
    """Names of the input fields (JSONL keys or Parquet columns)."""

    id: str = "id"
    text: str = "text"
    image: Optional[str] = "image"
    caption: Optional[str] = "caption"


def error(kind: str, message: str) -> str:
    return f"{kind}: {message}"


def error_kind(entry: str) -> str:
    return entry.split(":", 1)[0]


# -- 1. parsing -----------------------------------------------------------------------


class Malformed:
    """A record that could not be read at all (invalid JSON, not an object)."""

    def __init__(self, reason: str, raw: str = ""):
        self.reason = reason
        self.raw = raw


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


#: Lone UTF-16 surrogates: valid in a JSON string escape (``"\\ud800"``) and in a
#: Python ``str``, but not Unicode text: no UTF-8 writer (Arrow, Parquet) accepts them.
_SURROGATES = re.compile("[\ud800-\udfff]")


def _replace_surrogates(value: str) -> Tuple[str, int]:
    """``value`` with each lone surrogate replaced by U+FFFD (one character for one:
    entity offsets stay those of the input), and how many there were."""
    return _SURROGATES.subn("\ufffd", value)


def _excerpt(raw: str, n: int = 80) -> str:
    raw = raw.strip()
    return raw if len(raw) <= n else raw[:n] + "..."


def parse_lines(lines: Sequence[str], wheres: Sequence[str], columns: PostColumns) -> Batch:
    """JSONL lines -> a post batch; a line that is not a JSON object becomes an error row."""
    records: List[Any] = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError as err:
            records.append(Malformed(f"invalid JSON ({err})", line))
            continue
        if not isinstance(record, dict):
            records.append(Malformed(f"a line must hold a JSON object, not {type(record).__name__}", line))
        else:
            records.append(record)
    return parse_records(records, wheres, columns)


def post_id(record: Dict[str, Any], where: str, columns: PostColumns) -> Tuple[str, List[str]]:
    """A record's id as the output names it, and what was wrong with it: a record
    without a usable id is named by its place (``where``), which no other post has."""
    raw_id = record.get(columns.id)
    if _missing(raw_id) or (isinstance(raw_id, str) and not raw_id.strip()):
        return where, [error(BAD_INPUT, f"{where}: no {columns.id!r}; the row is named by its place")]
    if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool):
        the_id, bad = _replace_surrogates(str(raw_id))
        if bad:
            return the_id, [error(BAD_INPUT, f"{where}: {columns.id!r} holds {bad} lone surrogate(s) "
                                             "(not Unicode), replaced by U+FFFD")]
        return the_id, []
    return where, [error(BAD_INPUT, f"{where}: {columns.id!r} must be a string or an integer, "
                                    f"not {type(raw_id).__name__}")]


def parse_records(records: Sequence[Any], wheres: Sequence[str], columns: PostColumns) -> Batch:
    """Records (dicts) -> ``id``, ``text``, ``image``, ``caption``, ``errors``.

    ``wheres`` name each record's place in the input (``file:line``): the id of a
    record without one, and part of every message about it. Ids are strings.
    """
    batch: Batch = {name: [] for name in POST_COLUMNS}
    for record, where in zip(records, wheres):
        if isinstance(record, Malformed):
            batch["id"].append(where)
            batch["text"].append(None)
            batch["image"].append(None)
            batch["caption"].append(None)
            batch["errors"].append([error(BAD_INPUT, f"{where}: {record.reason}: {_excerpt(record.raw)!r}")])
            continue
        the_id, errors = post_id(record, where, columns)
        text = record.get(columns.text)
        if not isinstance(text, str):
            what = "missing" if _missing(text) else f"of type {type(text).__name__}, not a string"
            errors.append(error(BAD_INPUT, f"{where}: {columns.text!r} is {what}; not tagged"))
            text = None
        else:
            text, bad = _replace_surrogates(text)
            if bad:
                errors.append(error(BAD_INPUT, f"{where}: {columns.text!r} holds {bad} lone surrogate(s) "
                                                "(not Unicode), replaced by U+FFFD; tagged"))
        image = record.get(columns.image) if columns.image else None
        if _missing(image) or image == "":
            image = None
        elif not isinstance(image, str):
            errors.append(error(IMAGE_PREFIX + "refused", f"{columns.image!r} must be a path or URI string, "
                                                          f"not {type(image).__name__}"))
            image = None
        elif _SURROGATES.search(image):
            errors.append(error(IMAGE_PREFIX + "refused", f"{where}: {columns.image!r} holds a lone surrogate "
                                                          "(not Unicode): no file or URI has that name"))
            image = None
        caption = record.get(columns.caption) if columns.caption else None
        if _missing(caption) or caption == "":
            caption = None
        elif not isinstance(caption, str):
            errors.append(error(BAD_CAPTION, f"{columns.caption!r} must be a string, not "
                                             f"{type(caption).__name__}; tagged without it"))
            caption = None
        elif _SURROGATES.search(caption):
            errors.append(error(BAD_CAPTION, "the caption holds lone surrogates (not Unicode); tagged without it"))
            caption = None
        elif len(caption) > MAX_CAPTION_CHARS:
            errors.append(error(BAD_CAPTION, f"the caption has {len(caption)} characters, over "
                                             f"{MAX_CAPTION_CHARS}; tagged without it"))
            caption = None
        batch["id"].append(the_id)
        batch["text"].append(text)
        batch["image"].append(image)
        batch["caption"].append(caption)
        batch["errors"].append(errors)
    return batch


# -- 2. image bytes and content hash -----------------------------------------------------


def _scheme(ref: str) -> str:
    return ref.split("://", 1)[0].lower() if "://" in ref else ""


def read_image(ref: str, loader: ImageLoader) -> ImageSource:
    """An image's bytes: local paths and http(s) URLs through ``loader`` (its rules
    and limits), object-store URIs (s3://, gs://, hdfs://, ...) through pyarrow's
    filesystems, which, like URLs, need ``loader.allow_remote``."""
    scheme = _scheme(ref)
    if scheme == "file":
        return loader.read(ref[len("file://"):])
    if scheme not in OBJECT_STORE_SCHEMES:
        return loader.read(ref)
    if not loader.allow_remote:
        raise ImageLoadError(ref, "object-store image refused (allow remote images to read it)", "remote")
    cap = loader.remote_max_bytes
    try:
        from pyarrow import fs

        filesystem, path = fs.FileSystem.from_uri(ref)
        with filesystem.open_input_stream(path) as stream:
            data = stream.read(cap + 1)
    except FileNotFoundError:
        raise ImageLoadError(ref, "object not found", "missing") from None
    except Exception as err:  # credentials, network, unknown scheme: all name the image
        raise ImageLoadError(ref, f"cannot read: {err}", "remote") from None
    if len(data) > cap:
        raise ImageLoadError(ref, f"object exceeds {cap} bytes", "too_large")
    if not data:
        raise ImageLoadError(ref, "empty object", "corrupt")
    return ImageSource(name=ref, data=data)


def load_images(batch: Batch, loader: ImageLoader) -> Batch:
    """Add ``image_key`` (sha256 of the bytes) and ``image_bytes``; a failure clears
    the image and adds an ``image_<kind>`` error to the row."""
    keys: List[Optional[str]] = []
    datas: List[Optional[bytes]] = []
    errors = [list(e) for e in batch["errors"]]
    for i, ref in enumerate(batch["image"]):
        key = data = None
        if ref is not None and batch["text"][i] is not None:
            try:
                source = read_image(ref, loader)
                key, data = source.content_key(), source.data
            except ImageLoadError as err:
                errors[i].append(error(IMAGE_PREFIX + err.kind, f"{ref}: {err.reason}"))
        keys.append(key)
        datas.append(data)
    return {**batch, "image_key": keys, "image_bytes": datas, "errors": errors}


# -- 2b. captions (a pipeline with an image_captioner) ------------------------------------

#: Captioning an image failed: the post is tagged without a caption.
CAPTIONER = "captioner"


def captioner_of(nlp: Any) -> Any:
    """The pipeline's (first) image_captioner component, or None."""
    from ..units.captioner import captioner_pipes

    found = captioner_pipes(nlp)
    return found[0][1] if found else None


def caption(batch: Batch, captioner: Any) -> Batch:
    """Captions for the posts that have an image (read: ``image_key``) and no caption,
    from ``captioner.lookup`` (an ImageCaptioner: the features dataset's captions and
    its caption store first, its model on the misses), so that a pipeline reading
    captions sees the image. Adds ``caption_status``: none, given, cached (stored),
    generated or failed (with a ``captioner`` error on the row; the post is tagged
    without a caption). An image whose stored caption a damaged dataset file kept
    from being read gets a ``features`` error (its caption came from the store or
    the model instead)."""
    from ..units.captioner import CaptionOutcome

    n = len(batch["id"])
    errors = [list(e) for e in batch["errors"]]
    captions = list(batch["caption"])
    status = ["given" if c is not None else "none" for c in captions]
    keys, datas, names = batch["image_key"], batch["image_bytes"], batch["image"]
    todo = [i for i in range(n) if captions[i] is None and keys[i] is not None and batch["text"][i] is not None]
    images = [KeyedImage(keys[i], names[i], ImageSource(name=names[i], data=datas[i]) if datas[i] else None)
              for i in todo]
    try:
        found = captioner.lookup(images) if images else {}
    except Exception as err:  # the model itself failed: every post of the batch goes on without
        found = {im.key: CaptionOutcome("failed", None, im.ref, f"captioning failed: {err}") for im in images}
    unread = _unread_features(captioner)
    for i in todo:
        if keys[i] in unread:
            errors[i].append(error(FEATURES, f"{names[i]}: {unread[keys[i]]}; its caption was looked up in "
                                             "the captioner's store and model instead"))
        outcome = found[keys[i]]
        if outcome.status in ("cached", "generated"):
            captions[i], status[i] = outcome.caption or None, outcome.status
        else:
            status[i] = "failed"
            errors[i].append(error(CAPTIONER, f"{names[i]}: {outcome.reason or 'no caption'}; "
                                              "tagged without a caption"))
    return {**batch, "caption": captions, "caption_status": status, "errors": errors}


# -- 3. detection ------------------------------------------------------------------------


def detections_to_row(det: Detections) -> Tuple[bytes, List[str], List[float], List[float]]:
    """Detections as plain column values: float32 feature bytes, labels, scores, flat boxes."""
    return (
        det.features.astype("<f4").tobytes(),
        list(det.labels),
        [float(s) for s in det.scores],
        [float(v) for v in det.boxes.reshape(-1)],
    )


def row_to_detections(features: bytes, labels: List[str], scores: List[float], boxes: List[float],
                      dim: int = 0) -> Detections:
    """The inverse of :func:`detections_to_row`. The feature width follows from the
    bytes; ``dim`` (the detector's, as stored) is only needed for an image in which
    nothing was detected."""
    n = len(labels)
    array = numpy.frombuffer(features, dtype="<f4")
    dim = array.size // n if n else dim
    return Detections(
        features=array.reshape(n, dim) if n else numpy.zeros((0, dim), "float32"),
        labels=list(labels),
        scores=numpy.asarray(scores, "float32"),
        boxes=numpy.asarray(boxes, "float32").reshape(-1, 4),
    )


def detect(batch: Batch, units: Any) -> Batch:
    """Object columns for each row with an ``image_key``, from ``units.lookup``
    (an ObjectUnits: stored features first, its detector on the misses). Drops
    ``image_bytes``.

    ``image_status``: none (the post has no image), cached (read from stored
    features), detected, uncached (not stored and no detector) or failed (the
    image could not be read or was refused, or detection failed; with an error
    on the row).
    """

    n = len(batch["id"])
    errors = [list(e) for e in batch["errors"]]
    # A post whose image was refused or unreadable has an image error and no key.
    status: List[str] = ["failed" if any(error_kind(e).startswith(IMAGE_PREFIX) for e in errors[i]) else "none"
                         for i in range(n)]
    objects: List[Optional[Detections]] = [None] * n
    keys, datas, names = batch["image_key"], batch["image_bytes"], batch["image"]
    indices = [i for i in range(n) if keys[i] is not None]
    images = [KeyedImage(keys[i], names[i], ImageSource(name=names[i], data=datas[i]) if datas[i] else None)
              for i in indices]
    found = _lookup(units, images)
    unread = _unread_features(units)
    for i in indices:
        if keys[i] in unread:
            errors[i].append(error(FEATURES, f"{names[i]}: {unread[keys[i]]}; its objects were looked up "
                                             "in the pipeline's store and detector instead"))
        outcome = found[keys[i]]
        if outcome.status in ("cached", "detected"):
            status[i], objects[i] = outcome.status, outcome.detections
        elif outcome.status == "uncached":
            status[i] = "uncached"
        else:
            status[i] = "failed"
            kind = outcome.kind or "failed"
            label = {"failed": DETECTOR, OBJECTS: OBJECTS}.get(kind, IMAGE_PREFIX + kind)
            errors[i].append(error(label, f"{names[i]}: {outcome.reason or 'no result'}"))
    out = {k: v for k, v in batch.items() if k != "image_bytes"}
    out["errors"] = errors
    out["image_status"] = status
    rows = [detections_to_row(d) if d is not None else (None, None, None, None) for d in objects]
    out["obj_features"] = [r[0] for r in rows]
    out["obj_labels"] = [r[1] for r in rows]
    out["obj_scores"] = [r[2] for r in rows]
    out["obj_boxes"] = [r[3] for r in rows]
    return out


def _unread_features(units: Any) -> Dict[str, str]:
    """The images the features dataset could not be read for in the last lookups
    (content key -> why), taken from it (:meth:`~.features.FeatureDataset.take_unread`);
    ``units``: the object units or the captioner."""
    reader = getattr(units, "features", None)
    take = getattr(reader, "take_unread", None)
    return take() if callable(take) else {}


def _lookup(units: Any, images: List[Any]) -> Dict[str, Any]:
    """``units.lookup`` on the batch; if it raises (a damaged store row, an
    unreadable dataset file), once per image, so that the fault costs only the
    images it concerns: each becomes an ``objects`` error on its rows."""
    from ..units.objects import Outcome

    if not images:
        return {}
    try:
        return units.lookup(images)
    except Exception:
        pass
    found: Dict[str, Any] = {}
    for image in {im.key: im for im in images}.values():
        try:
            found.update(units.lookup([image]))
        except Exception as err:
            found[image.key] = Outcome("failed", None, image.ref, f"cannot get its objects: {err}", OBJECTS)
    return found


# -- 4. tagging --------------------------------------------------------------------------


def agban_pipes(nlp: Any) -> List[Any]:
    from ..pipeline import AGBANRecognizer

    return [pipe for _, pipe in nlp.pipeline if isinstance(pipe, AGBANRecognizer)]


def uses_objects(nlp: Any) -> bool:
    """Whether the pipeline was trained with object units (they then need images)."""
    from ..units.base import OBJECT

    return any(OBJECT in pipe.cfg.get("unit_dims", {}) for pipe in agban_pipes(nlp))


class ColumnObjects(ObjectUnitSource):
    """An object-unit source that hands the pipe the units computed by :func:`detect`
    (kept on each doc's ``user_data``), so ``nlp.pipe`` never detects again."""

    def __call__(self, docs: Sequence[Any]) -> List[list]:
        return [list(doc.user_data.get(_OBJECTS_KEY, ())) for doc in docs]


@contextlib.contextmanager
def column_objects(nlp: Any) -> Iterator[None]:
    """Swap every agban pipe's object units for :class:`ColumnObjects` while inside."""
    pipes = [p for p in agban_pipes(nlp) if p.object_units is not None or uses_objects(nlp)]
    saved = [p.object_units for p in pipes]
    for pipe in pipes:
        pipe.object_units = ColumnObjects()
    try:
        yield
    finally:
        for pipe, units in zip(pipes, saved):
            pipe.object_units = units


def _units_of(batch: Batch, i: int) -> list:
    from ..units.objects import to_units

    labels = batch.get("obj_labels", [None] * (i + 1))[i]
    if labels is None:
        return []
    det = row_to_detections(batch["obj_features"][i], labels, batch["obj_scores"][i], batch["obj_boxes"][i])
    return to_units(det)


def _entities(doc: Any) -> List[Dict[str, Any]]:
    # confidence: the CRF's, as the pipe stores it (None with store_confidence off)
    return [{"start_char": e.start_char, "end_char": e.end_char, "label": e.label_, "text": e.text,
             "confidence": e._.agban_confidence} for e in doc.ents]


def _visual_units(doc: Any) -> List[Dict[str, Any]]:
    return [{"source": u.get("source"), "label": u.get("label"),
             "score": None if u.get("score") is None else float(u["score"])}
            for u in (doc._.visual_units or [])]


def tag(batch: Batch, nlp: Any, batch_size: int = 64) -> Batch:
    """Run the pipeline on a batch of posts -> output columns (one row per post).

    The whole batch goes through ``nlp.pipe``; if that raises, posts are retried
    one by one, each first as it is, then without its caption, then without its
    objects: the post keeps what works and gets an error naming what did not.
    """
    n = len(batch["id"])
    errors = [list(e) for e in batch["errors"]]
    objects = [_units_of(batch, i) for i in range(n)]
    todo = [i for i in range(n) if batch["text"][i] is not None]

    def make(i: int, caption: bool = True, with_objects: bool = True) -> Any:
        doc = nlp.make_doc(batch["text"][i])
        doc._.image_caption = batch["caption"][i] if caption else None
        doc.user_data[_OBJECTS_KEY] = objects[i] if with_objects else []
        return doc

    done: Dict[int, Any] = {}
    with column_objects(nlp):
        try:
            docs = [make(i) for i in todo]
            done = dict(zip(todo, nlp.pipe(docs, batch_size=batch_size)))
        except Exception:
            done = {}
            for i in todo:
                done[i] = _tag_one(nlp, i, make, batch, errors)
    entities, units = [], []
    for i in range(n):
        doc = done.get(i)
        entities.append(_entities(doc) if doc is not None else [])
        units.append(_visual_units(doc) if doc is not None else [])
    return {
        "id": list(batch["id"]),
        "entities": entities,
        "visual_units": units,
        "image_key": list(batch.get("image_key", [None] * n)),
        "image_status": list(batch.get("image_status", ["none"] * n)),
        "error": ["; ".join(e) if e else None for e in errors],
        "error_kinds": [sorted({error_kind(x) for x in e}) if e else [] for e in errors],
    }


def _tag_one(nlp: Any, i: int, make: Callable[..., Any], batch: Batch, errors: List[List[str]]) -> Any:
    attempts = [(True, True, None)]
    if batch["caption"][i] is not None:
        attempts.append((False, True, BAD_CAPTION))
    attempts.append((False, False, TAG))
    first_error: Optional[BaseException] = None
    for caption, with_objects, blame in attempts:
        try:
            doc = nlp(make(i, caption=caption, with_objects=with_objects))
        except Exception as err:
            first_error = first_error or err
            continue
        if blame == BAD_CAPTION:
            errors[i].append(error(BAD_CAPTION, f"the pipeline failed on the caption ({first_error}); "
                                                "tagged without it"))
        elif blame == TAG:
            errors[i].append(error(TAG, f"the pipeline failed with the image's objects ({first_error}); "
                                        "tagged from the text"))
        return doc
    errors[i].append(error(TAG, f"the pipeline failed on this post: {first_error}"))
    return None


# -- summaries ---------------------------------------------------------------------------


def count_rows(batch: Batch, counts: Optional[Counter] = None) -> Counter:
    """Add a batch's output rows to running counts: posts, errors by kind, image statuses."""
    counts = counts if counts is not None else Counter()
    counts["posts"] += len(batch["id"])
    for kinds in batch["error_kinds"]:
        if kinds:
            counts["posts_with_errors"] += 1
        for kind in kinds:
            counts[f"error:{kind}"] += 1
    for status in batch["image_status"]:
        counts[f"image:{status}"] += 1
    return counts


def format_summary(counts: Counter, seconds: float, engine: str) -> str:
    posts = counts["posts"]
    rate = posts / seconds if seconds > 0 else 0.0
    errors = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("error:")}
    images = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("image:") and k != "image:none"}
    lines = [f"tag ({engine}): {posts} posts in {seconds:.1f} s ({rate:.1f} posts/s); "
             f"{counts['posts_with_errors']} with errors."]
    if images:
        # cached: read from stored features (the features dataset or the store)
        names = {"cached": "read from stored features", "detected": "detected",
                 "uncached": "not stored (no detector)", "failed": "failed"}
        order = sorted(images, key=lambda k: (list(names).index(k) if k in names else len(names), k))
        lines.append("images: " + ", ".join(f"{images[k]} {names.get(k, k)}" for k in order))
    if errors:
        lines.append("errors by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(errors.items())))
    captions = {k.split(":", 1)[1]: v for k, v in counts.items()
                if k.startswith("caption:") and k not in ("caption:none", "caption:given")}
    if captions:
        names = {"generated": "generated", "cached": "read from the caption store", "failed": "failed"}
        lines.append("captions of images: " + ", ".join(f"{captions[k]} {names.get(k, k)}" for k in sorted(captions)))
    if errors.get(FEATURES):
        lines.append(f"features: the features dataset could not be read for the images of {errors[FEATURES]} "
                     "posts (a damaged file, named in their error); they were looked up in the pipeline's "
                     "store and detector instead" + (" (captions: the captioner's store and model)."
                                                     if captions else "."))
    return "\n".join(lines)


def resume_note(output: Any, tagged: int, earlier: int, earlier_parts: int) -> str:
    """The summary line after a resumed run: what the whole output holds, not only
    what this run tagged."""
    if not earlier_parts:
        return ""
    return (f"\noutput: {earlier + tagged} posts in all in {output} ({tagged} tagged by this run, "
            f"{earlier} in the {earlier_parts} parts an earlier run wrote).")


def images_not_read_note(not_read: int) -> str:
    """The summary line when posts name images the pipeline cannot use."""
    if not not_read:
        return ""
    return (f"\nnote: this pipeline does not read images (it was trained without object units): "
            f"the image of {not_read} posts was not used.")


# -- Arrow schemas (pyarrow is imported only when a schema is asked for) ----------------------


def output_schema() -> Any:
    import pyarrow as pa

    entity = pa.struct([("start_char", pa.int32()), ("end_char", pa.int32()),
                        ("label", pa.string()), ("text", pa.string()), ("confidence", pa.float64())])
    unit = pa.struct([("source", pa.string()), ("label", pa.string()), ("score", pa.float64())])
    return pa.schema([
        ("id", pa.string()), ("entities", pa.list_(entity)), ("visual_units", pa.list_(unit)),
        ("image_key", pa.string()), ("image_status", pa.string()),
        ("error", pa.string()), ("error_kinds", pa.list_(pa.string())),
    ])


def stage_schema(names: Sequence[str]) -> Any:
    """The Arrow schema of the intermediate columns named (fixed types, so that a
    batch whose values are all null still has the types of the others)."""
    import pyarrow as pa

    types = {
        "id": pa.string(), "text": pa.string(), "image": pa.string(), "caption": pa.string(),
        "errors": pa.list_(pa.string()), "image_key": pa.string(), "image_bytes": pa.binary(),
        "image_status": pa.string(), "obj_features": pa.binary(), "obj_labels": pa.list_(pa.string()),
        "obj_scores": pa.list_(pa.float32()), "obj_boxes": pa.list_(pa.float32()),
        "part": pa.int64(), "row": pa.int64(), "caption_status": pa.string(),
    }
    return pa.schema([(name, types[name]) for name in names])


def to_table(batch: Batch, schema: Any) -> Any:
    import pyarrow as pa

    return pa.Table.from_pydict({name: batch[name] for name in schema.names}, schema=schema)
