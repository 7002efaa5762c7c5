"""``spacy_agban.ObjectUnits.v1``: the object units of a batch of docs.

Store first, detector only on the misses: detection costs about a second per
image on a CPU, a store hit a file hash and one SQLite lookup. Images are
batched across the docs of a batch (and deduplicated), and new results are
written back one detector batch per transaction. A bad image never stops the
batch: it is named in a warning and its doc gets no object units (it then
falls back to its caption or its text). Without a detector, images missing from
the store are still decoded once, so that a bad one is named rather than
counted among the merely unstored.
"""
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Protocol, Sequence, Tuple, Union

from spacy.tokens import Doc
from spacy.util import registry

from .base import MAX_WARNINGS, OBJECT, ObjectUnitSource, SkipWarnings, VisualUnit
from ..detection.detector import RCNNDetector
from ..detection.images import (
    DEFAULT_MAX_PIXELS,
    ImageLoader,
    ImageLoadError,
    ImageSource,
    ImageWarning,
    KeyedImage,
    content_key,
    describe,
    first_per_key,
    key_images,
)
from ..detection.store import Detections, FeatureStore, check_is_feature_store, missing_store_message

#: Images decoded at once per detector batch; bounds memory for large doc batches.
DECODE_BATCHES = 4


@dataclass
class Outcome:
    """What happened to one image reference.

    status: ``none`` (no image), ``cached``, ``detected``, ``uncached`` (store miss
    and no detector), ``missing`` (file not found) or ``failed``.
    """

    status: str
    detections: Optional[Detections] = None
    name: Optional[str] = None
    reason: Optional[str] = None
    kind: Optional[str] = None


class FeatureReader(Protocol):
    """Stored detections keyed by content and detector signature, read before the
    store (the batch engines attach a Parquet features dataset here). A reader that
    is ``writable`` also receives new detections through ``put_many``."""

    writable: bool

    def signatures(self) -> Dict[str, Dict[str, Any]]: ...

    def get_many(self, image_keys: Iterable[str], sig: str) -> Dict[str, Detections]: ...

    def put_many(self, entries: Sequence[Tuple[str, Detections]], sig: str,
                 description: Optional[Dict[str, Any]] = None) -> None: ...


class ObjectUnits(ObjectUnitSource):
    """Object units from a feature store, a detector, or both."""

    def __init__(
        self,
        store: Optional[Union[str, Path, FeatureStore]] = None,
        detector: Optional[RCNNDetector] = None,
        image_root: Optional[Union[str, Path]] = None,
        allow_remote: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        top_k: int = 3,
        signature: Optional[str] = None,
        record_failures: bool = False,
        max_warnings: int = MAX_WARNINGS,
        features: Optional[FeatureReader] = None,
    ):
        if store is None and detector is None and features is None:
            raise ValueError("ObjectUnits needs a feature store, a detector, or both")
        if detector is not None and top_k > detector.top_k:
            raise ValueError(f"top_k={top_k} exceeds the detector's top_k={detector.top_k}")
        #: As configured, and the file it names (a relative path against the current
        #: folder; a saved pipeline points it at the store it was saved with: use_store).
        self.store_arg = str(store) if isinstance(store, (str, Path)) else None
        self.store_path = Path(store).expanduser().resolve() if isinstance(store, (str, Path)) else None
        # A missing store is an error at load (the pipe calls check_store once it has
        # looked for the copy a saved pipeline keeps in its own folder) or before the first
        # lookup, never created empty: not here, where a saved pipeline's path is not
        # resolved yet (a packaged pipeline's store lives inside the package).
        self._store: Optional[FeatureStore] = store if isinstance(store, FeatureStore) else None
        self._saved_store: Optional[Path] = None
        self.detector = detector
        self.top_k = top_k
        #: As configured (a relative one is resolved against the current folder by the loader).
        self.image_root_arg = None if image_root is None else str(image_root)
        self.loader = ImageLoader(
            image_root=image_root,
            allow_remote=allow_remote,
            max_pixels=max_pixels,
            max_side=detector.max_size if detector is not None else None,
        )
        self._signature_arg = signature
        self._signature: Optional[str] = None
        self.record_failures = record_failures
        self.skipped = SkipWarnings("images", ImageWarning, limit=max_warnings)
        #: Read before the store (None: the store alone); see :class:`FeatureReader`.
        self.features: Optional[FeatureReader] = features
        #: Whether new detections go to the store (a cluster worker only reads it).
        self.write_store = True
        # Counters, for tests and the summaries: distinct images per lookup.
        self.n_detector_images = 0
        self.n_store_hits = 0
        self.n_feature_hits = 0
        self._warned_no_detector = False
        self._key_memo: Dict[Any, str] = {}
        # Without a detector: content keys of unstored images already checked to decode.
        self._decodable: set = set()

    def use_image_root(self, folder: Union[str, Path]) -> None:
        """Resolve relative image paths against this folder from now on."""
        self.loader.image_root = Path(folder).resolve()
        self._key_memo.clear()
        self._decodable.clear()

    @property
    def max_warnings(self) -> int:
        """Images named in a warning of their own (the rest are counted); 0: none,
        as in the batch engines, where a bad image is an error row instead."""
        return self.skipped.limit

    @max_warnings.setter
    def max_warnings(self, value: int) -> None:
        self.skipped.limit = value

    @property
    def n_warnings(self) -> int:
        """Distinct images skipped so far (named in a warning or, past the limit, counted)."""
        return self.skipped.count

    # -- configuration resolved on first use (the store may not exist at build time)

    @property
    def store(self) -> Optional[FeatureStore]:
        if self._store is None and self.store_path is not None:
            self.check_store()
            self._store = FeatureStore(self.store_path, create=self.creates_store)
        return self._store

    @property
    def creates_store(self) -> bool:
        # Only a source that detects writes to the store, so only it may create one.
        return self.detector is not None and self.write_store

    def check_store(self) -> None:
        """Raise now rather than at the first doc if the store cannot be used: missing
        (without a detector to fill it), or a file that is not a feature store (never
        written to). Creates nothing."""
        if self._store is not None or self.store_path is None:
            return
        if self.store_path.exists():
            check_is_feature_store(self.store_path, create=self.creates_store)
        elif not self.creates_store:
            raise FileNotFoundError(missing_store_message(
                Path(self.store_arg or self.store_path), self.store_path, self._saved_store))

    def use_store(self, path: Union[str, Path], saved: Optional[Union[str, Path]] = None) -> None:
        """Read (and write) the store at ``path`` from now on. saved: where the pipeline
        was saved with its store, named in the error if ``path`` turns out missing."""
        self.store_path = Path(path).expanduser().resolve()
        self._saved_store = Path(saved) if saved is not None else None
        self._store = None
        self._signature = None

    def pin_signature(self, signature: str) -> None:
        """Read only the features of this detector signature: the one the model was
        trained with (the agban pipe records it and pins it when loaded)."""
        if self.detector is not None and self.detector.signature_key() != signature:
            raise ValueError(
                f"the model was trained on object features of detector signature {signature!r}, "
                f"but the configured detector has {self.detector.signature_key()!r} "
                f"({self.detector.signature()}): configure the detector as in training"
            )
        if self._signature_arg is not None and self._signature_arg != signature:
            raise ValueError(
                f"object units configured with signature {self._signature_arg!r}, but the "
                f"model was trained on features of signature {signature!r}"
            )
        self._signature_arg = signature
        self._signature = None

    @property
    def signature(self) -> str:
        """The detector signature key whose entries this source reads and writes."""
        if self._signature is None:
            self._signature = self._resolve_signature()
        return self._signature

    def _resolve_signature(self) -> str:
        wanted = self._signature_arg
        if self.detector is not None:
            key = self.detector.signature_key()
            if wanted is not None and wanted != key:
                raise ValueError(
                    f"signature {wanted!r} given, but the detector's is {key!r} "
                    f"({self.detector.signature()})"
                )
            if self.store is not None and self.write_store:
                self.store.register_signature(key, self.detector.signature())
            return key
        source: Any = self.store if self.store is not None else self.features
        assert source is not None
        known = source.signatures()
        if wanted is not None:
            if not (self.store.holds(wanted) if self.store is not None else wanted in known):
                self._warn_unknown_signature(wanted, known)
            return wanted
        if len(known) == 1:
            return next(iter(known))
        if not known:  # every lookup misses; __call__ warns once, docs fall back
            return ""
        raise ValueError(
            f"the feature store {self._source_name()} holds {len(known)} detector signatures; "
            f"configure object units with signature = one of {sorted(known)}"
        )

    # -- UnitSource -------------------------------------------------------------

    def __call__(self, docs: Sequence[Doc]) -> List[List[VisualUnit]]:
        refs = [doc._.get("image") for doc in docs]
        units = [to_units(outcome.detections) for outcome in self.detections_for(refs)]
        self.skipped.report()  # a batch ends here
        return units

    def detections_for(self, refs: Sequence[Any]) -> List[Outcome]:
        """One :class:`Outcome` per image reference (None: no image)."""
        outcomes: List[Optional[Outcome]] = [Outcome("none") if ref is None else None for ref in refs]
        keyed, failed = key_images(refs, self._content_key)
        for i, err in failed.items():
            outcomes[i] = self._failed(err)
        found = self.lookup(list(keyed.values())) if keyed else {}
        for i, image in keyed.items():
            outcome = found[image.key]
            # a stored result is named after each reference that asked for it
            outcomes[i] = Outcome("cached", outcome.detections, describe(refs[i])) if outcome.status == "cached" else outcome
        if self.record_failures and self.store is not None:
            self._record_failures(outcomes)  # type: ignore[arg-type]
        return outcomes  # type: ignore[return-value]

    def lookup(self, images: Sequence["KeyedImage"]) -> Dict[str, Outcome]:
        """One :class:`Outcome` per distinct content key: the stored features first
        (the ``features`` reader, then the store), the detector on the misses (one
        detection per distinct image; new results are written back). Without a
        detector a miss is decoded once and is ``uncached`` (or ``failed``, named).

        The one keyed lookup of this package: the pipe (through
        :meth:`detections_for`) and the batch engines (which read and hash the
        images themselves) both call it.
        """
        first = first_per_key(images)
        found: Dict[str, Outcome] = {}
        pending = list(first)
        if self.features is not None and pending:
            hits = self.features.get_many(pending, self.signature)
            self.n_feature_hits += len(hits)
            for key, det in hits.items():
                found[key] = Outcome("cached", det.head(self.top_k), describe(first[key].ref))
            pending = [k for k in pending if k not in hits]
        if self.store is not None and pending:
            hits = self.store.get_many(pending, self.signature)
            self.n_store_hits += len(hits)
            for key, det in hits.items():
                found[key] = Outcome("cached", det.head(self.top_k), describe(first[key].ref))
            pending = [k for k in pending if k not in hits]
        misses = {key: first[key] for key in pending}
        if misses and self.detector is None:
            found.update(self._check_unstored(misses))
        elif misses:
            found.update(self._detect_misses(misses))
        return found

    def _record_failures(self, outcomes: List[Outcome]) -> None:
        failed = {o.name: o for o in outcomes if o.status in ("failed", "missing")}
        assert self.store is not None
        if failed:
            rows = [(name or "?", o.kind or "failed", o.reason or "") for name, o in failed.items()]
            self.store.record_failures(rows, self.signature)
        done = [o.name for o in outcomes if o.status in ("detected", "cached") and o.name]
        if done:
            self.store.clear_failures(done, self.signature)

    # -- steps --------------------------------------------------------------------

    def _content_key(self, ref: Any) -> Tuple[str, Optional[ImageSource]]:
        return content_key(self.loader, ref, self._key_memo)

    def _check_unstored(self, misses: Dict[str, "KeyedImage"]) -> Dict[str, Outcome]:
        """Store misses without a detector: decode each once, so that a bad image is
        named (as it would be with a detector) and only good ones count as unstored."""
        found: Dict[str, Outcome] = {}
        for key, image in misses.items():
            if key not in self._decodable:
                try:
                    self.loader.decode(image.source or self.loader.read(image.ref))
                except ImageLoadError as err:
                    found[key] = self._failed(err)
                    continue
                self._decodable.add(key)
            found[key] = Outcome("uncached", None, describe(image.ref))
        if found and any(o.status == "uncached" for o in found.values()):
            self._warn_no_detector(sum(o.status == "uncached" for o in found.values()))
        return found

    def _detect_misses(self, misses: Dict[str, "KeyedImage"]) -> Dict[str, Outcome]:
        assert self.detector is not None
        found: Dict[str, Outcome] = {}
        chunk_size = self.detector.batch_size * DECODE_BATCHES
        pending = list(misses.items())
        for start in range(0, len(pending), chunk_size):
            loaded = []
            for key, keyed in pending[start : start + chunk_size]:
                try:
                    loaded.append((key, self.loader.decode(keyed.source or self.loader.read(keyed.ref))))
                except ImageLoadError as err:
                    found[key] = self._failed(err)
            results = self._run_detector([image for _, image in loaded])
            written = []
            for (key, image), result in zip(loaded, results):
                if isinstance(result, Exception):
                    found[key] = self._failed(ImageLoadError(image.name, f"detector failed: {result}", "failed"))
                else:
                    result = rescale_boxes(result, image.scale)
                    written.append((key, result))
                    found[key] = Outcome("detected", result.head(self.top_k), image.name)
            if written:
                self._write_back(written)
        return found

    def _write_back(self, written: List[Tuple[str, Detections]]) -> None:
        """New detections to the store (one transaction per chunk) and the features
        dataset, where each is writable."""
        if self.store is not None and self.write_store:
            self.store.put_many(written, self.signature)
        if self.features is not None and self.features.writable:
            description = self.detector.signature() if self.detector is not None else None
            self.features.put_many(written, self.signature, description)

    def _run_detector(self, images: List[Any]) -> List[Union[Detections, Exception]]:
        """Detect a chunk; if it fails, retry image by image so one bad image costs only itself."""
        assert self.detector is not None
        if not images:
            return []
        try:
            results: List[Union[Detections, Exception]] = list(self.detector([im.image for im in images]))
            self.n_detector_images += len(images)
            return results
        except Exception:
            if len(images) == 1:
                raise
        out: List[Union[Detections, Exception]] = []
        for image in images:
            try:
                out.extend(self._run_detector([image]))
            except Exception as err:  # one image at a time now: blame that image only
                out.append(err)
        return out

    # -- failures and warnings ----------------------------------------------------

    def _failed(self, err: ImageLoadError) -> Outcome:
        status = "missing" if err.kind == "missing" else "failed"
        self._warn(err.path, err.reason)
        return Outcome(status, None, err.path, err.reason, err.kind)

    def _warn(self, name: str, reason: str) -> None:
        self.skipped.warn(
            name,
            f"Skipping image {name!r}: {reason}. Its doc gets no object units "
            "(it falls back to its caption or its text).",
            stacklevel=4,
        )

    def _source_name(self) -> str:
        return str(self.store.path) if self.store is not None else str(getattr(self.features, "root", self.features))

    def _warn_unknown_signature(self, signature: str, known: Dict[str, Dict[str, object]]) -> None:
        self._warned_no_detector = True  # this says more than the generic store-miss warning
        warnings.warn(
            f"The feature store {self._source_name()} holds no object features of detector "
            f"signature {signature!r} (the detector the model was trained with, or the one "
            f"configured); it holds {len(known)} other signature(s): {sorted(known)}. Every "
            "doc gets no object units. Fill the store with that detector and settings "
            "(`python -m spacy_agban detect`), or point the object units at its store.",
            ImageWarning,
            stacklevel=5,
        )

    def _warn_no_detector(self, n: int) -> None:
        if not self._warned_no_detector:
            self._warned_no_detector = True
            warnings.warn(
                f"{n} image(s) are not in the feature store {self.store.path if self.store else None} "
                "and no detector is configured: those docs get no object units. "
                "Run `python -m spacy_agban detect` to fill the store.",
                ImageWarning,
                stacklevel=4,
            )


def rescale_boxes(detections: Detections, scale: Tuple[float, float]) -> Detections:
    """Boxes from the loaded (possibly downscaled) image back to the original's coordinates."""
    sx, sy = scale
    if (sx, sy) == (1.0, 1.0) or len(detections) == 0:
        return detections
    boxes = detections.boxes / [sx, sy, sx, sy]
    return Detections(detections.features, detections.labels, detections.scores, boxes)


def to_units(detections: Optional[Detections]) -> List[VisualUnit]:
    if detections is None:
        return []
    return [
        VisualUnit(
            source=OBJECT,
            vector=detections.features[j],
            label=detections.labels[j],
            score=float(detections.scores[j]),
            box=tuple(float(v) for v in detections.boxes[j]),  # type: ignore[arg-type]
        )
        for j in range(len(detections))
    ]


@registry.misc("spacy_agban.ObjectUnits.v1")
def make_object_units(
    store: Optional[str] = None,
    detector: Optional[RCNNDetector] = None,
    image_root: Optional[str] = None,
    allow_remote: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    top_k: int = 3,
    signature: Optional[str] = None,
) -> ObjectUnits:
    """Object units from a feature store (``store``), a detector, or both.

    With a store and no detector, ``signature`` names the detector whose stored
    features to use (not needed when the store holds only one; a trained pipeline
    pins the one it was trained with). Without a detector the store must exist.
    """
    return ObjectUnits(
        store=store,
        detector=detector,
        image_root=image_root,
        allow_remote=allow_remote,
        max_pixels=max_pixels,
        top_k=top_k,
        signature=signature,
    )

