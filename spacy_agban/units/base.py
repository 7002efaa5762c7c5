"""Visual units: the k vectors (with metadata) that the fusion attends over.

Two sources feed a doc's units, alone or together:

- ``object``: the top-k objects detected in ``doc._.image`` (1024-d box-head features
  of Mask R-CNN, the paper's setting); see :mod:`spacy_agban.detection`.
- ``caption``: the content words of ``doc._.image_caption`` (alt text or an automatic
  caption), each as its word vector. Our extension beyond the paper.
"""
import logging
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Optional, Sequence, Set, Tuple, Type

import numpy
from spacy.tokens import Doc
from spacy.util import registry

from .caption_words import content_words
from ..layers.static_vectors import vector_rows

OBJECT = "object"
CAPTION = "caption"
OBJECT_FEATURE_DIM = 1024
#: Name at most this many skipped inputs one by one (a corpus whose images were
#: never downloaded would otherwise print thousands of warnings).
MAX_WARNINGS = 10

logger = logging.getLogger("spacy_agban")


class CaptionWarning(UserWarning):
    """A caption was ignored; its doc goes on without caption units."""


class SkipWarnings:
    """One warning per skipped input (image, caption), naming it, for the first
    ``limit``; the rest are counted, and :meth:`report` logs how many went unnamed.

    Call :meth:`report` at the end of each batch: past the limit, a corpus full of
    bad inputs then costs one log line per batch, and nothing is skipped unheard.
    """

    def __init__(self, what: str, category: Type[Warning], limit: int = MAX_WARNINGS):
        self.what = what
        self.category = category
        self.limit = limit
        self.count = 0  # distinct inputs skipped so far
        self.unreported = 0  # skipped without a warning since the last report
        self._seen: Set[Hashable] = set()

    def warn(self, key: Hashable, message: str, stacklevel: int = 2) -> None:
        if key in self._seen:  # the same input again (next epoch, next call): said already
            return
        self._seen.add(key)
        self.count += 1
        if self.count <= self.limit:
            warnings.warn(message, self.category, stacklevel=stacklevel + 1)
            return
        self.unreported += 1
        if self.count == self.limit + 1 and self.limit > 0:
            warnings.warn(
                f"More than {self.limit} {self.what} could not be used; further {self.what} are "
                "skipped without a warning of their own (their number is logged after each batch).",
                self.category,
                stacklevel=stacklevel + 1,
            )

    def report(self) -> None:
        """Log how many inputs were skipped without a warning since the last report."""
        if self.unreported:
            logger.warning(
                "%d more %s could not be used and were skipped without a warning of their "
                "own (%d in all so far).", self.unreported, self.what, self.count,
            )
            self.unreported = 0


def doc_name(doc: Doc, chars: int = 40) -> str:
    """A doc's first characters, to name it in a message."""
    text = doc.text
    return repr(text if len(text) <= chars else text[:chars] + "...")


def caption_of(doc: Doc, skipped: SkipWarnings) -> Optional[str]:
    """``doc._.image_caption`` if it is a non-empty string, else None.

    A caption of another type (a number, a list, bytes) is a caller's mistake in one
    doc; like a bad image, it costs that doc its caption units, not the batch.
    """
    caption = doc._.get("image_caption")
    if caption is None or isinstance(caption, str):
        return caption or None
    kind = type(caption).__name__
    skipped.warn(
        (doc.text, kind),
        f"Ignoring the caption of doc {doc_name(doc)}: doc._.image_caption must be a string, "
        f"not {kind}. The doc goes on without caption units.",
        stacklevel=3,
    )
    return None


@dataclass
class VisualUnit:
    """One visual unit: a feature vector and what it stands for."""

    source: str
    vector: numpy.ndarray
    label: str
    score: Optional[float] = None
    box: Optional[Tuple[float, float, float, float]] = None

    def meta(self) -> Dict[str, object]:
        """The msgpack-safe metadata stored in ``doc._.visual_units``."""
        return {
            "source": self.source,
            "label": self.label,
            "score": None if self.score is None else float(self.score),
            "box": None if self.box is None else [float(v) for v in self.box],
        }


@dataclass
class DocUnits:
    """The visual units of one doc, grouped by source (each ``(n, dim)`` float32)."""

    units: List[VisualUnit] = field(default_factory=list)

    def vectors(self, source: str, dim: int) -> numpy.ndarray:
        rows = [u.vector for u in self.units if u.source == source]
        if not rows:
            return numpy.zeros((0, dim), dtype="float32")
        return numpy.stack(rows).astype("float32", copy=False)

    def meta(self) -> List[Dict[str, object]]:
        return [u.meta() for u in self.units]


class UnitSource(ABC):
    """What the pipe needs from a source of visual units (caption, objects).

    Called with a batch of docs, a source returns each doc's units, in the order
    of the docs; an empty list where a doc has none or its input could not be used
    (after a warning naming it). A source that warns about skipped inputs logs, at
    the end of each call, how many went unnamed (see :class:`SkipWarnings`).
    Batch in, units out, as spaCy's models take docs: a source that gains from
    batching (an encoder, a detector) batches inside its call.
    """

    @property
    def width(self) -> Optional[int]:
        """The dimension of every unit vector; None: the width of the word vectors
        (a source whose units are word vectors cannot know it before the vocab)."""
        return None

    @abstractmethod
    def __call__(self, docs: Sequence[Doc]) -> List[List[VisualUnit]]:
        """The units of each doc of ``docs``."""


class ObjectUnitSource(UnitSource):
    """A source of object units (filled by :mod:`.detection`): each doc's top-k
    objects of ``doc._.image`` (``source="object"``, 1024-d vectors).

    Features mean something only to a model trained on the same detector's:
    ``signature`` names that detector, and :meth:`pin_signature` restricts a loaded
    source to the one a model was trained on.
    """

    @property
    def width(self) -> Optional[int]:
        return OBJECT_FEATURE_DIM

    @property
    def signature(self) -> Optional[str]:
        """The detector whose features this source reads (None: not tied to one)."""
        return None

    def pin_signature(self, signature: str) -> None:
        """Read only the features of detector ``signature``; nothing to do for a
        source not tied to a detector."""


class CaptionUnits(UnitSource):
    """Turn ``doc._.image_caption`` into up to ``top_k`` caption units.

    Each unit is a content word of the caption (stop words, punctuation, numbers
    and repeats dropped, caption order kept) represented by its lowercase word
    vector; words without a vector are skipped.
    """

    def __init__(self, top_k: int = 8, max_chars: int = 1000):
        if top_k < 0:
            raise ValueError(f"caption top_k must be >= 0, got {top_k}")
        self.top_k = top_k
        self.max_chars = max_chars
        self.skipped = SkipWarnings("captions", CaptionWarning)

    def __call__(self, docs: Sequence[Doc]) -> List[List[VisualUnit]]:
        units = [self.for_doc(doc) for doc in docs]
        self.skipped.report()  # a batch ends here
        return units

    def for_doc(self, doc: Doc) -> List[VisualUnit]:
        """The caption units of one doc."""
        caption = caption_of(doc, self.skipped)
        if caption is None or self.top_k == 0:
            return []
        vocab = doc.vocab
        words = content_words(caption, self.max_chars)
        keys = numpy.asarray([vocab.strings.add(w) for w in words], dtype="uint64")
        rows = vector_rows(vocab, keys)
        units = []
        for word, row in zip(words, rows):
            if row < 0:
                continue
            vector = numpy.asarray(vocab.vectors.data[row], dtype="float32")
            units.append(VisualUnit(source=CAPTION, vector=vector, label=word))
            if len(units) == self.top_k:
                break
        return units


@registry.misc("spacy_agban.CaptionUnits.v1")
def make_caption_units(top_k: int = 8) -> CaptionUnits:
    return CaptionUnits(top_k=top_k)
