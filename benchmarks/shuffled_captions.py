"""Write a DocBin whose posts carry another post's caption and image (a control).

A model trained on such a corpus sees visual context with the same words, lengths and
frequency as the real one, but unrelated to its post. Trained the same way as on the
real corpus and scored on the real test split, it tells what a row's gain owes to what
the captions say and what to the training regime alone (modality dropout, the
cross-view term, the extra parameters). The permutation is a seeded derangement: no
post keeps its own context.
"""
import random
from pathlib import Path
from typing import List, Optional, Tuple

import spacy
import typer
from spacy.tokens import DocBin

import spacy_agban  # noqa: F401  (registers doc._.image / doc._.image_caption)
from spacy_agban.training.docs_io import read_references
from spacy_agban.extensions import INPUT_EXTENSIONS


def derangement(n: int, seed: int) -> List[int]:
    """A random permutation of range(n) with no fixed point (n >= 2): Sattolo's cycle."""
    if n < 2:
        raise ValueError(f"need at least 2 posts to exchange their context, got {n}")
    order = list(range(n))
    rng = random.Random(seed)
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)  # j < i: one cycle through every index, so nothing stays put
        order[i], order[j] = order[j], order[i]
    return order


def shuffle_context(source: Path, target: Path, seed: int) -> Tuple[int, int]:
    """Copy ``source`` to ``target`` with the visual context moved between posts.

    Returns (posts, posts whose caption text changed).
    """
    nlp = spacy.blank("en")
    docs = list(read_references(nlp, source))
    contexts: List[Tuple[Optional[object], ...]] = [
        tuple(doc._.get(name) for name in INPUT_EXTENSIONS) for doc in docs
    ]
    order = derangement(len(docs), seed)
    out = DocBin(store_user_data=True)
    changed = 0
    for doc, j in zip(docs, order):
        before = doc._.image_caption
        for name, value in zip(INPUT_EXTENSIONS, contexts[j]):
            doc._.set(name, value)
        changed += doc._.image_caption != before
        out.add(doc)
    target.parent.mkdir(parents=True, exist_ok=True)
    out.to_disk(target)
    return len(docs), changed


def main(
    source: Path = typer.Argument(..., exists=True, dir_okay=False, help="DocBin with the real context"),
    target: Path = typer.Argument(..., dir_okay=False, help="Where the shuffled DocBin goes"),
    seed: int = typer.Option(0, help="Seed of the permutation"),
) -> None:
    posts, changed = shuffle_context(source, target, seed)
    typer.echo(f"{target}: {posts} posts, {changed} with another caption than their own")


if __name__ == "__main__":
    typer.run(main)
