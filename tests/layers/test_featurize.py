"""The batched, cached featurizer builds exactly the arrays of a plain per-token loop."""
import numpy
from spacy.attrs import LOWER

from spacy_agban.layers.featurize import Featurizer, batch_static_vectors, char_ids
from spacy_agban.units.base import DocUnits

from conftest import make_nlp


def per_token_arrays(featurizer: Featurizer, docs, units, tags) -> dict:
    """The featurizer's arrays built token by token in Python: what the batched,
    cached code must reproduce exactly."""
    n_docs, max_len = len(docs), max(len(doc) for doc in docs)
    width, n_chars = featurizer.static_width, featurizer.max_word_chars
    word_ids = numpy.zeros((n_docs, max_len), dtype="int64")
    vectors = numpy.zeros((n_docs, max_len, width), dtype="float32")
    chars = numpy.zeros((n_docs, max_len, n_chars), dtype="int64")
    char_lengths = numpy.zeros((n_docs, max_len), dtype="int64")
    token_mask = numpy.zeros((n_docs, max_len), dtype="bool")
    gold = numpy.zeros((n_docs, max_len), dtype="int64")
    for i, doc in enumerate(docs):
        token_mask[i, : len(doc)] = True
        lower = doc.to_array([LOWER]).reshape(-1).astype("uint64")
        vectors[i, : len(doc)] = batch_static_vectors(doc.vocab, lower, width)
        for j, token in enumerate(doc):
            word_ids[i, j] = featurizer.word_row(token.lower_)
            ids = char_ids(token.text, n_chars)
            chars[i, j, : len(ids)] = ids
            char_lengths[i, j] = len(ids)
        gold[i, : len(doc)] = tags[i]
    return {"word_ids": word_ids, "static_vectors": vectors, "char_ids": chars,
            "char_lengths": char_lengths, "token_mask": token_mask, "tags": gold}


def test_batched_featurizer_equals_per_token():
    nlp = make_nlp()
    texts = ["Kolo is here", "I love PARIS today!!", "Straße 東京 😀 supercalifragilisticexpialidocious", "a"]
    docs = [nlp.make_doc(t) for t in texts]
    featurizer = Featurizer(["kolo", "paris", "love", "i"], 8, {"caption": 8}, max_word_chars=6)
    units = [DocUnits([]) for _ in docs]
    tags = [[1] * len(d) for d in docs]
    for _ in range(2):  # the second call reads the caches
        new = featurizer(docs, units, tags)
        old = per_token_arrays(featurizer, docs, units, tags)
        for key in ("word_ids", "static_vectors", "char_ids", "char_lengths", "token_mask", "tags"):
            assert numpy.array_equal(new[key], old[key]), key
            assert new[key].dtype == old[key].dtype, key
