"""Score a pipeline on a DocBin with and without the posts' visual context.

Most real posts have no image or caption, so every quality figure of a multimodal
tagger comes in two columns: the posts as stored (image and caption given to the
model) and the same posts with the visual context removed (text only). Nothing is
removed from the reference docs: only the model's input changes.
"""
import random
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

from spacy.language import Language
from spacy.training import Example

from ..units.caption_words import caption_words, is_content_word
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


# ----- what caption quality is worth -------------------------------------------------------
# A cheaper captioner writes shorter or vaguer captions, and a caption from the wrong post is
# worse than none. Each variant below rewrites the stored captions of the posts (the text,
# the image path and the gold entities stay), so one trained pipeline can be scored on
# captions of several qualities without retraining.


def first_words(caption: str, n: int = 5) -> str:
    """The caption's first ``n`` words (a short, cheap caption)."""
    return " ".join(caption.split()[:n])


#: Position words that spaCy's stop list keeps ("in front of", "next to", "near").
POSITION_WORDS = frozenset({"near", "front", "next", "beside", "inside", "outside", "atop", "onto"})


def noun_like_words(caption: str) -> str:
    """The caption's content words less verb and adverb forms (-ing, -ed, -ly) and position
    words: nouns and a few adjectives. A heuristic: no part-of-speech tagger ships offline here."""
    words = [w for w in caption_words(caption, 1000) if is_content_word(w.lower())]
    return " ".join(w for w in words if not w.lower().endswith(("ing", "ed", "ly")) and w.lower() not in POSITION_WORDS)


def derangement(n: int, seed: int) -> List[int]:
    """A permutation of range(n) that moves every index (n >= 2): post i gets the caption of
    post order[i], never its own."""
    if n < 2:
        raise ValueError("another post's caption needs at least two captioned posts")
    rng = random.Random(seed)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        if all(i != j for i, j in enumerate(order)):
            return order


CAPTION_VARIANTS: Dict[str, str] = {
    "stored": "the captions as stored",
    "first5": "each caption cut to its first 5 words",
    "nouns": "each caption's content words less -ing/-ed/-ly forms",
    "shuffled": "another post's caption (a derangement: no post keeps its own)",
    "none": "no caption and no image (the without-context column)",
}


def with_caption_variant(examples: Sequence[Example], variant: str, seed: int = 0) -> List[Example]:
    """The examples with their predicted docs' captions rewritten as ``variant`` says
    (:data:`CAPTION_VARIANTS`); references untouched."""
    if variant not in CAPTION_VARIANTS:
        raise ValueError(f"caption variant must be one of {', '.join(CAPTION_VARIANTS)}, got {variant!r}")
    docs = [eg.predicted for eg in examples]
    if variant == "none":
        for doc in docs:
            doc._.image = None
            doc._.image_caption = None
        return list(examples)
    captioned = [doc for doc in docs if doc._.image_caption]
    rewrite: Optional[Callable[[str], str]] = {"first5": first_words, "nouns": noun_like_words}.get(variant)
    if variant == "shuffled":
        captions = [doc._.image_caption for doc in captioned]
        for doc, source in zip(captioned, derangement(len(captioned), seed)):
            doc._.image_caption = captions[source]
    elif rewrite is not None:
        for doc in captioned:
            doc._.image_caption = rewrite(doc._.image_caption) or None
    return list(examples)


def evaluate_caption_variants(
    nlp: Language, path: Union[str, Path], variants: Sequence[str], batch_size: int = 64, seed: int = 0
) -> Dict[str, Dict]:
    """Scores of the posts under each caption variant, side by side."""
    return {
        variant: nlp.evaluate(with_caption_variant(make_examples(nlp, path, True), variant, seed), batch_size=batch_size)
        for variant in variants
    }
