"""Docs + visual units -> padded arrays for the torch model (no learning here)."""
from typing import Dict, List, Optional, Sequence

import numpy
from spacy.attrs import IS_SPACE, LOWER, ORTH
from spacy.tokens import Doc

from .static_vectors import vector_rows
from ..units.base import DocUnits

N_CHARS = 1024  # 0 padding, 1..255 Latin-1, the rest hashed by code point
_LATIN1 = 255
_MAX_CACHE = 500_000  # per-token caches are cleared past this many forms

# Word shape: the case of a token's letters and a mention/hashtag prefix, one id per form
# (0 = padding). GloVe and uncased encoders see lowercase only; this hands the word BiLSTM
# the capitalization directly, where the char BiLSTM has to learn it from characters.
CASES = ("none", "lower", "title", "upper", "mixed")  # "none": no letters at all
PREFIXES = ("", "@", "#")
N_SHAPES = 1 + len(CASES) * len(PREFIXES)


def word_shape(text: str) -> int:
    """The shape id (1..N_SHAPES-1) of a token's exact form."""
    prefix = PREFIXES.index(text[0]) if text[:1] in ("@", "#") else 0
    letters = [char for char in text if char.isalpha()]
    if not letters:
        case = "none"
    elif not any(char.isupper() for char in letters):
        case = "lower"  # also scripts without case
    elif all(char.isupper() for char in letters):
        case = "upper" if len(letters) > 1 else "title"  # "I", "A" read as capitalized
    elif letters[0].isupper() and not any(char.isupper() for char in letters[1:]):
        case = "title"
    else:
        case = "mixed"  # iPhone, McDonald, BBCNews
    return 1 + prefix * len(CASES) + CASES.index(case)


def char_ids(text: str, max_chars: int) -> List[int]:
    """Deterministic ids (no vocabulary, no Python hash seed): Latin-1 gets its own."""
    ids = []
    for char in text[:max_chars]:
        code = ord(char)
        ids.append(code if 0 < code <= _LATIN1 else _LATIN1 + 1 + code % (N_CHARS - _LATIN1 - 1))
    return ids or [1]


def batch_static_vectors(vocab, lower: numpy.ndarray, width: int) -> numpy.ndarray:
    """The pretrained vector of each token by its lowercase key (zeros if none).

    ``lower`` holds the LOWER keys of the tokens of many docs, concatenated.
    """
    out = numpy.zeros((len(lower), width), dtype="float32")
    rows = vector_rows(vocab, lower)
    found = rows >= 0
    if found.any():
        data = vocab.vectors.data
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
        shapes: bool = False,
    ):
        self.words = list(words)
        self._row_of: Dict[str, int] = {w: i + 1 for i, w in enumerate(self.words)}
        self.static_width = static_width
        self.unit_dims = dict(unit_dims)
        self.max_word_chars = max_word_chars
        self.shapes = shapes  # word-shape ids only for a model that embeds them
        self._key_cache: Dict[int, int] = {}  # lowercase key -> word row
        self._form_cache: Dict[int, numpy.ndarray] = {}  # exact key -> char ids, length, shape

    def word_row(self, token_lower: str) -> int:
        """Row of the trainable table; 0 for padding and words not seen in training."""
        return self._row_of.get(token_lower, 0)

    def __call__(
        self,
        docs: Sequence[Doc],
        units: Sequence[DocUnits],
        tags: Optional[Sequence[Sequence[int]]] = None,
    ) -> Dict[str, object]:
        """Arrays for non-empty docs only (the CRF needs at least one token).

        Per-token work is cached by string key (the training vocabulary row of each
        lowercase form, the char ids and shape of each exact form), and the arrays are filled for
        the whole batch at once through the token mask (row-major: doc by doc).
        """
        n_docs = len(docs)
        if n_docs == 0 or any(len(doc) == 0 for doc in docs):
            raise ValueError("Featurizer needs a non-empty batch of non-empty docs")
        lengths = numpy.asarray([len(doc) for doc in docs])
        max_len = int(lengths.max())
        token_mask = numpy.arange(max_len)[None, :] < lengths[:, None]
        keys = numpy.concatenate([doc.to_array([LOWER, ORTH, IS_SPACE]) for doc in docs]).astype("uint64")
        lower, orth = keys[:, 0], keys[:, 1]
        outside_only = numpy.zeros((n_docs, max_len), dtype="bool")  # whitespace tokens
        outside_only[token_mask] = keys[:, 2].astype("bool")
        strings = docs[0].vocab.strings
        word_ids = numpy.zeros((n_docs, max_len), dtype="int64")
        word_ids[token_mask] = self._word_rows(lower, strings)
        vectors = numpy.zeros((n_docs, max_len, self.static_width), dtype="float32")
        if self.static_width:
            vectors[token_mask] = batch_static_vectors(docs[0].vocab, lower, self.static_width)
        chars = numpy.zeros((n_docs, max_len, self.max_word_chars), dtype="int64")
        char_lengths = numpy.zeros((n_docs, max_len), dtype="int64")
        shapes = numpy.zeros((n_docs, max_len), dtype="int64") if self.shapes else None
        form_chars, form_lengths, form_shapes = self._form_rows(orth, strings)
        chars[token_mask], char_lengths[token_mask] = form_chars, form_lengths
        if shapes is not None:
            shapes[token_mask] = form_shapes
        gold = numpy.zeros((n_docs, max_len), dtype="int64")
        if tags is not None:
            gold[token_mask] = numpy.concatenate([numpy.asarray(t, dtype="int64") for t in tags])
        arrays: Dict[str, object] = {
            "word_ids": word_ids,
            "static_vectors": vectors,
            "char_ids": chars,
            "char_lengths": char_lengths,
            "shape_ids": shapes,
            "token_mask": token_mask,
            "outside_only": outside_only,
            "tags": gold if tags is not None else None,
        }
        # the exact form's hash as int64, for the model's per-form caches
        token_keys = numpy.zeros((n_docs, max_len), dtype="int64")
        token_keys[token_mask] = orth.view("int64")
        arrays["token_keys"] = token_keys
        arrays["units"], arrays["unit_masks"] = self.unit_arrays(units)
        return arrays

    def _word_rows(self, lower: numpy.ndarray, strings) -> numpy.ndarray:
        cache = self._key_cache
        if len(cache) > _MAX_CACHE:
            cache.clear()
        rows = []
        for key in lower.tolist():
            row = cache.get(key)
            if row is None:
                row = cache[key] = self.word_row(strings[key])
            rows.append(row)
        return numpy.asarray(rows, dtype="int64")

    def _form_rows(self, orth: numpy.ndarray, strings):
        """(N, max_word_chars) char ids, (N,) lengths and (N,) shapes (0 with shapes off)
        of N tokens, by exact form."""
        cache = self._form_cache
        if len(cache) > _MAX_CACHE:
            cache.clear()
        rows = []
        for key in orth.tolist():
            row = cache.get(key)
            if row is None:
                text = strings[key]
                ids = char_ids(text, self.max_word_chars)
                row = cache[key] = numpy.zeros((self.max_word_chars + 2,), dtype="int64")
                row[: len(ids)] = ids
                row[-2] = len(ids)
                row[-1] = word_shape(text) if self.shapes else 0
            rows.append(row)
        stacked = numpy.stack(rows)
        return stacked[:, :-2], stacked[:, -2], stacked[:, -1]

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
