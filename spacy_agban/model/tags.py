"""BIO tags as the model numbers them, and the one reading of entities from them.

The tag layout is ``O, B-L1, I-L1, B-L2, I-L2, ...`` (labels in the pipe's order).
An entity starts at any tag but O (a stray I- without its B- too, as spaCy's
``iob_to_biluo`` and conlleval read it) and runs over the I- tags of its label
that follow. The pipe sets ``doc.ents`` and the CRF drops unsure entities by this
one reading, so the two cannot disagree about where an entity is.
"""
from typing import List, Sequence, Tuple

OUTSIDE_TAG = 0


def tag_names(labels: Sequence[str]) -> List[str]:
    """The tag strings of the layout: ``O``, then ``B-``/``I-`` of each label."""
    return ["O"] + [f"{prefix}-{label}" for label in labels for prefix in ("B", "I")]


def label_of(tag: int) -> int:
    """The label index of a B- or I- tag id."""
    return (tag - 1) // 2


def entity_spans(tags: Sequence[int]) -> List[Tuple[int, int, int]]:
    """The entities of one tag-id sequence as ``(start, end, label index)``."""
    spans = []
    start, n = 0, len(tags)
    while start < n:
        tag, end = tags[start], start + 1
        if tag != OUTSIDE_TAG:
            inside = tag + 1 if (tag - OUTSIDE_TAG) % 2 == 1 else tag  # B-x -> I-x; a stray I-x
            while end < n and tags[end] == inside:
                end += 1
            spans.append((start, end, label_of(tag)))
        start = end
    return spans
