"""Score a pipeline on a DocBin with and without the posts' visual context.

Most real posts have no image or caption, so every quality figure of a multimodal
tagger comes in two columns: the posts as stored (image and caption given to the
model) and the same posts with the visual context removed (text only). Nothing is
removed from the reference docs: only the model's input changes.
"""
from pathlib import Path
from typing import Dict, List, Union

from spacy.language import Language
from spacy.training import Example

from .docs_io import fresh_doc, read_references

WITH_CONTEXT = "with_context"
WITHOUT_CONTEXT = "without_context"


def make_examples(nlp: Language, path: Union[str, Path], visual_context: bool = True) -> List[Example]:
    return [Example(fresh_doc(nlp, ref, visual_context), ref) for ref in read_references(nlp, path)]


def evaluate(
    nlp: Language, path: Union[str, Path], visual_context: bool = True, batch_size: int = 64
) -> Dict[str, object]:
    """``nlp.evaluate`` on the DocBin's posts, with or without their visual context."""
    return nlp.evaluate(make_examples(nlp, path, visual_context), batch_size=batch_size)


def evaluate_both(nlp: Language, path: Union[str, Path], batch_size: int = 64) -> Dict[str, Dict]:
    """Scores with the stored visual context and with it removed, side by side."""
    return {
        WITH_CONTEXT: evaluate(nlp, path, True, batch_size),
        WITHOUT_CONTEXT: evaluate(nlp, path, False, batch_size),
    }
