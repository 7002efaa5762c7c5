"""Posts from a DocBin as a pipeline's input: fresh docs with the text and the visual context.

A stored doc is the reference (its annotation is the gold standard); the pipeline gets a
new doc with the same text and, unless asked otherwise, the same image and caption.
"""
from itertools import islice
from pathlib import Path
from typing import Iterator, List, Union

from spacy.language import Language
from spacy.tokens import Doc, DocBin

from ..extensions import INPUT_EXTENSIONS, copy_visual_context


def read_references(nlp: Language, path: Union[str, Path]) -> Iterator[Doc]:
    """The annotated docs of a DocBin, with their stored ``doc._`` values."""
    yield from DocBin(store_user_data=True).from_disk(path).get_docs(nlp.vocab)


def fresh_doc(nlp: Language, reference: Doc, visual_context: bool = True) -> Doc:
    """A new doc from the reference's text, with its visual context or without it."""
    doc = nlp.make_doc(reference.text)
    if visual_context:
        copy_visual_context(reference, doc)
    else:
        for name in INPUT_EXTENSIONS:
            doc._.set(name, None)
    return doc


def read_fresh_docs(
    nlp: Language, path: Union[str, Path], limit: int = 0, visual_context: bool = True
) -> List[Doc]:
    """Fresh docs (text, image, caption; no annotation) of a DocBin's first ``limit`` posts (0: all)."""
    references = read_references(nlp, path)
    if limit:
        references = islice(references, limit)
    return [fresh_doc(nlp, reference, visual_context) for reference in references]
