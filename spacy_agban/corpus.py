"""Readers that give predicted docs the same visual context as the reference docs.

spaCy builds each training/evaluation example as ``Example(nlp.make_doc(ref.text),
ref)``: the predicted doc is made from the text alone and loses ``doc._.image`` and
``doc._.image_caption``. The visual context is *input*, not
annotation, so we copy it onto the predicted doc:

:func:`patch_stock_corpus` wraps ``Corpus._make_example``, the one place where spaCy
builds those examples, for training and for ``spacy evaluate`` (which always uses the
stock ``Corpus``). It is applied when this module is imported: by the registered
reader ``spacy_agban.Corpus.v1`` that the configs name, and by spaCy's entry points
as soon as it loads a pipeline with an ``agban`` component.
"""
import functools
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

from spacy.language import Language
from spacy.training import Corpus, Example
from spacy.util import registry

from .extensions import copy_visual_context, install_extensions

_PATCH_FLAG = "_spacy_agban_visual_context"


def with_visual_context(example: Example) -> Example:
    copy_visual_context(example.reference, example.predicted)
    return example


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
    install_extensions()
    patch_stock_corpus()
    return Corpus(
        path, gold_preproc=gold_preproc, max_length=max_length, limit=limit, augmenter=augmenter
    )


def patch_stock_corpus() -> None:
    """Make spaCy's stock ``Corpus`` (used by ``spacy evaluate``) keep the visual context."""
    original = Corpus._make_example
    if getattr(original, _PATCH_FLAG, False):
        return

    @functools.wraps(original)
    def _make_example(self: Corpus, nlp: Language, reference, gold_preproc: bool) -> Example:
        return with_visual_context(original(self, nlp, reference, gold_preproc))

    setattr(_make_example, _PATCH_FLAG, True)
    Corpus._make_example = _make_example  # type: ignore[method-assign]


patch_stock_corpus()
