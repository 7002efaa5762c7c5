"""Docs + visual units -> padded arrays for the torch model (no learning here)."""
from typing import Dict, List, Optional, Sequence

import numpy
from spacy.attrs import LOWER
from spacy.tokens import Doc

from .visual_units import DocUnits, vector_rows

N_CHARS = 1024  # 0 padding, 1..255 Latin-1, the rest hashed by code point
_LATIN1 = 255


def char_ids(text: str, max_chars: int) -> List[int]:
    """Deterministic ids (no vocabulary, no Python hash seed): Latin-1 gets its own."""
    ids = []
    for char in text[:max_chars]:
        code = ord(char)
        ids.append(code if 0 < code <= _LATIN1 else _LATIN1 + 1 + code % (N_CHARS - _LATIN1 - 1))
    return ids or [1]


def lower_keys(doc: Doc) -> numpy.ndarray:
    return doc.to_array([LOWER]).reshape(-1).astype("uint64")


def static_vectors(doc: Doc, width: int) -> numpy.ndarray:
    """The pretrained vector of each token by its lowercase form (zeros if none)."""
    out = numpy.zeros((len(doc), width), dtype="float32")
    if width == 0:
        return out
    rows = vector_rows(doc.vocab, lower_keys(doc))
    found = rows >= 0
    if found.any():
        data = doc.vocab.vectors.data
        if not isinstance(data, numpy.ndarray):  # cupy on GPU
            data = data.get()
        out[found] = data[rows[found]]
    return out


class Featurizer:
    """Builds the padded arrays of a batch; sizes come from the pipe's cfg."""

    def __init__(
        self,
        words: Sequence[str],
        static_width: int,
        unit_dims: Dict[str, int],
        max_word_chars: int,
    ):
        self.words = list(words)
        self._row_of: Dict[str, int] = {w: i + 1 for i, w in enumerate(self.words)}
        self.static_width = static_width
        self.unit_dims = dict(unit_dims)
        self.max_word_chars = max_word_chars
        self._key_cache: Dict[int, int] = {}

    @property
    def n_words(self) -> int:
        return len(self.words) + 1  # row 0: padding and words not seen in training

    def word_row(self, token_lower: str) -> int:
        return self._row_of.get(token_lower, 0)

    def __call__(
        self,
        docs: Sequence[Doc],
        units: Sequence[DocUnits],
        tags: Optional[Sequence[Sequence[int]]] = None,
    ) -> Dict[str, object]:
        """Arrays for non-empty docs only (the CRF needs at least one token)."""
        n_docs = len(docs)
        if n_docs == 0 or any(len(doc) == 0 for doc in docs):
            raise ValueError("Featurizer needs a non-empty batch of non-empty docs")
        max_len = max(len(doc) for doc in docs)
        word_ids = numpy.zeros((n_docs, max_len), dtype="int64")
        vectors = numpy.zeros((n_docs, max_len, self.static_width), dtype="float32")
        chars = numpy.zeros((n_docs, max_len, self.max_word_chars), dtype="int64")
        char_lengths = numpy.zeros((n_docs, max_len), dtype="int64")
        token_mask = numpy.zeros((n_docs, max_len), dtype="bool")
        gold = numpy.zeros((n_docs, max_len), dtype="int64")
        for i, doc in enumerate(docs):
            n = len(doc)
            token_mask[i, :n] = True
            vectors[i, :n] = static_vectors(doc, self.static_width)
            for j, token in enumerate(doc):
                word_ids[i, j] = self.word_row(token.lower_)
                ids = char_ids(token.text, self.max_word_chars)
                chars[i, j, : len(ids)] = ids
                char_lengths[i, j] = len(ids)
            if tags is not None:
                gold[i, :n] = tags[i]
        arrays: Dict[str, object] = {
            "word_ids": word_ids,
            "static_vectors": vectors,
            "char_ids": chars,
            "char_lengths": char_lengths,
            "token_mask": token_mask,
            "tags": gold if tags is not None else None,
        }
        arrays["units"], arrays["unit_masks"] = self.unit_arrays(units)
        return arrays

    def unit_arrays(self, units: Sequence[DocUnits]):
        """Per source: (B, K, D) zero-padded vectors and a (B, K) mask (K >= 1)."""
        vectors, masks = {}, {}
        for source, dim in self.unit_dims.items():
            per_doc = [doc_units.vectors(source, dim) for doc_units in units]
            k = max([1] + [len(v) for v in per_doc])
            padded = numpy.zeros((len(units), k, dim), dtype="float32")
            mask = numpy.zeros((len(units), k), dtype="bool")
            for i, rows in enumerate(per_doc):
                padded[i, : len(rows)] = rows
                mask[i, : len(rows)] = True
            vectors[source], masks[source] = padded, mask
        return vectors, masks
