"""Readers that give predicted docs the same visual context as the reference docs.

spaCy builds each training/evaluation example as ``Example(nlp.make_doc(ref.text),
ref)``: the predicted doc is made from the text alone and loses ``doc._.image`` and
``doc._.image_caption``. When a reference is longer than ``max_length`` (split into
sentences) or read with ``gold_preproc``, spaCy also replaces it by ``Span.as_doc()``,
which drops ``user_data``, so the reference itself loses them. The visual context is
*input*, not annotation: each example's two docs get the context of the doc they were
read from.

- Training: the registered reader ``spacy_agban.Corpus.v1`` (what the configs name)
  is :class:`VisualContextCorpus`, a ``Corpus`` subclass; nothing global changes.
- ``spacy evaluate`` (and ``spacy benchmark accuracy``) always builds spaCy's own
  ``Corpus``, which this package changes in one case only: when an ``agban`` pipe is
  built *inside* spaCy's ``spacy.cli.evaluate.evaluate`` (which loads the pipeline
  before it reads the data), the ``agban`` factory calls
  :func:`patch_stock_corpus_in_spacy_evaluate`, which gives ``Corpus`` the same two
  methods for the rest of that process. Building or loading a pipeline anywhere else
  (``spacy.load``, ``nlp.add_pipe``, training) leaves ``Corpus`` as spaCy ships it.
- Anyone else who reads agban data with the stock ``Corpus`` opts in explicitly with
  :func:`patch_stock_corpus` (or uses ``spacy_agban.Corpus.v1``).

Both wrap the public ``Corpus.make_examples`` and ``make_examples_gold_preproc``, one
reference doc at a time, so spaCy's own splitting logic runs unchanged; their signature
is checked first, and a spaCy that changed them is an error, not a silent loss.
"""
import inspect
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

from spacy.language import Language
from spacy.tokens import Doc
from spacy.training import Corpus, Example
from spacy.util import registry

from ..extensions import copy_visual_context

_METHODS = ("make_examples", "make_examples_gold_preproc")
_SIGNATURE = ["self", "nlp", "reference_docs"]
_PATCH_FLAG = "_spacy_agban_visual_context"

MakeExamples = Callable[[Corpus, Language, Iterable[Doc]], Iterator[Example]]


def _checked(method: MakeExamples) -> MakeExamples:
    params = list(inspect.signature(method).parameters)
    if params != _SIGNATURE:
        raise RuntimeError(
            f"spacy.training.Corpus.{method.__name__} takes {params}, not {_SIGNATURE}: this "
            "spaCy version builds examples differently from the one spacy-agban supports, so "
            "doc._.image and doc._.image_caption could be lost without notice. Install the "
            "spaCy version pinned by spacy-agban (see its setup.cfg)."
        )
    return method


def keeping_visual_context(stock: MakeExamples) -> MakeExamples:
    """``stock`` run one reference at a time, each example given that reference's context."""

    def make(self: Corpus, nlp: Language, reference_docs: Iterable[Doc]) -> Iterator[Example]:
        for reference in reference_docs:
            for example in stock(self, nlp, [reference]):
                # reference sentences made by Span.as_doc() have no user_data
                copy_visual_context(reference, example.reference)
                copy_visual_context(reference, example.predicted)
                yield example

    make.__name__ = stock.__name__
    make.__doc__ = stock.__doc__
    setattr(make, _PATCH_FLAG, True)
    return make


# the stock methods, kept before any patch so that the subclass never wraps twice
_STOCK = {name: _checked(getattr(Corpus, name)) for name in _METHODS}


class VisualContextCorpus(Corpus):
    """``spacy.training.Corpus`` whose examples keep ``doc._.image`` and ``doc._.image_caption``."""

    make_examples = keeping_visual_context(_STOCK["make_examples"])
    make_examples_gold_preproc = keeping_visual_context(_STOCK["make_examples_gold_preproc"])


@registry.readers("spacy_agban.Corpus.v1")
def create_visual_corpus_reader(
    path: Optional[Union[str, Path]],
    gold_preproc: bool = False,
    max_length: int = 0,
    limit: int = 0,
    augmenter: Optional[Callable[[Language, Example], Iterable[Example]]] = None,
) -> Callable[[Language], Iterable[Example]]:
    """Like ``spacy.Corpus.v1``, keeping ``doc._.image`` and ``doc._.image_caption``."""
    if path is None:
        raise ValueError("spacy_agban.Corpus.v1 needs a path to a .spacy file or folder")
    return VisualContextCorpus(
        path, gold_preproc=gold_preproc, max_length=max_length, limit=limit, augmenter=augmenter
    )


def patch_stock_corpus() -> None:
    """Make spaCy's own ``Corpus`` (the one ``spacy evaluate`` reads with) keep the context."""
    for name in _METHODS:
        current = getattr(Corpus, name)
        if getattr(current, _PATCH_FLAG, False):
            continue
        setattr(Corpus, name, keeping_visual_context(_checked(current)))


def patch_stock_corpus_in_spacy_evaluate() -> bool:
    """:func:`patch_stock_corpus` when called from within spaCy's ``evaluate``; else nothing.

    ``spacy evaluate MODEL DATA`` builds ``Corpus(DATA)`` and then loads the pipeline
    (building its ``agban`` pipe) before it reads a doc, so patching at that moment is
    in time. Returns whether it patched.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "evaluate" and frame.f_globals.get("__name__") == "spacy.cli.evaluate":
            patch_stock_corpus()
            return True
        frame = frame.f_back
    return False
