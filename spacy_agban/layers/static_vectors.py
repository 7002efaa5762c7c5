"""Static word vectors: the one lookup of their rows (:func:`vector_rows`), and the spaCy
baseline's embedding, spaCy's MultiHashEmbed with the GloVe lookup by LOWER.

GloVe 6B is lowercase. spaCy's ``StaticVectors`` looks rows up by ``vocab.vectors.attr``,
which spaCy 3.8 keeps in memory but does not write to ``vectors.cfg``: a
pipeline trained with ``attr = LOWER`` silently reads vectors by exact token after
``spacy.load``. A callback cannot fix it either: ``[nlp] after_pipeline_creation`` runs
before ``Vocab.from_disk``, which resets ``attr`` to ORTH from the saved cfg.

So the key attribute lives in the model instead: :func:`lower_static_vectors` takes it
as a config argument (saved in ``config.cfg`` with the pipeline) and never reads
``vocab.vectors.attr``. :func:`multi_hash_embed_lower` is spaCy's ``MultiHashEmbed.v2``
with that layer in place of ``StaticVectors``; everything else is the same.
"""
from typing import Callable, List, Optional, Tuple, Union, cast

import numpy
from spacy.attrs import IDS
from spacy.ml.models.tok2vec import MultiHashEmbed
from spacy.tokens import Doc
from spacy.util import registry
from spacy.vocab import Vocab
from thinc.api import Model, Ragged, glorot_uniform_init
from thinc.types import Floats2d, Ints1d


def vector_rows(vocab: Vocab, keys: numpy.ndarray) -> numpy.ndarray:
    """Rows of ``vocab.vectors`` for string keys (-1 where a key has no vector).

    Every reader of the vectors looks rows up here, by keys it chose itself (the
    lowercase form, or the attribute a config names) rather than through
    ``Vectors.attr``, which spaCy 3.8 does not save: the lookup a model trains with
    is then the one it uses after ``spacy.load``.
    """
    if vocab.vectors.shape[0] == 0 or len(keys) == 0:
        return numpy.full((len(keys),), -1, dtype="int64")
    return numpy.asarray(vocab.vectors.find(keys=keys), dtype="int64")


STATIC_VECTORS = "static_vectors"


@registry.layers("spacy_agban.StaticVectors.v1")
def lower_static_vectors(
    nO: Optional[int] = None, key_attr: str = "LOWER"
) -> Model[List[Doc], Ragged]:
    """Pretrained vectors by ``key_attr`` (default LOWER), then a learned projection to nO."""
    attr_id = IDS[key_attr.upper()]
    return Model(
        STATIC_VECTORS,
        _static_vectors_forward,
        init=_static_vectors_init,
        params={"W": None},
        attrs={"key_attr": attr_id},
        dims={"nO": nO, "nM": None},
    )


def token_keys(docs: List[Doc], attr_id: int) -> numpy.ndarray:
    """Each token's ``attr_id`` value, the key of its vector, all docs concatenated."""
    keys = numpy.concatenate([cast(Ints1d, doc.to_array(attr_id)).reshape(-1) for doc in docs])
    return keys.astype("uint64")


def _static_vectors_forward(
    model: Model[List[Doc], Ragged], docs: List[Doc], is_train: bool
) -> Tuple[Ragged, Callable]:
    ops = model.ops
    n_out = model.get_dim("nO")
    lengths = ops.asarray1i([len(doc) for doc in docs])
    if not docs or not int(lengths.sum()):
        return Ragged(ops.alloc2f(0, n_out), lengths), lambda d: []
    rows = vector_rows(docs[0].vocab, token_keys(docs, model.attrs["key_attr"]))
    found = ops.asarray(rows >= 0)
    table = ops.asarray(docs[0].vocab.vectors.data)
    V = ops.as_contig(table[ops.asarray(rows)])
    V[~found] = 0  # no vector: a zero input, so the projection adds nothing
    W = cast(Floats2d, model.get_param("W"))
    Y = ops.gemm(V, W, trans2=True)

    def backprop(dY: Ragged) -> List[Doc]:
        model.inc_grad("W", ops.gemm(cast(Floats2d, dY.data), V, trans1=True))
        return []

    return Ragged(Y, lengths), backprop


def _static_vectors_init(
    model: Model[List[Doc], Ragged], X: Optional[List[Doc]] = None, Y: Optional[Ragged] = None
) -> Model[List[Doc], Ragged]:
    if X is not None and len(X):
        model.set_dim("nM", X[0].vocab.vectors.shape[1])
    if Y is not None:
        model.set_dim("nO", Y.data.shape[1])
    if not model.has_dim("nM") or not model.get_dim("nM"):
        raise ValueError(
            "spacy_agban.StaticVectors.v1 found no word vectors: set [initialize] vectors"
        )
    model.set_param("W", glorot_uniform_init(model.ops, (model.get_dim("nO"), model.get_dim("nM"))))
    return model


@registry.architectures("spacy_agban.MultiHashEmbedLower.v1")
def multi_hash_embed_lower(
    width: int,
    attrs: List[Union[str, int]],
    rows: List[int],
    vectors_attr: str = "LOWER",
) -> Model[List[Doc], List[Floats2d]]:
    """``spacy.MultiHashEmbed.v2`` (include_static_vectors = true), vectors by ``vectors_attr``."""
    model = MultiHashEmbed(width, attrs, rows, include_static_vectors=True)
    replaced = _replace_static_vectors(model, lower_static_vectors(width, vectors_attr))
    if not replaced:
        raise RuntimeError("spaCy's MultiHashEmbed has no StaticVectors layer to replace")
    return model


def _replace_static_vectors(model: Model, new: Model) -> bool:
    """Swap the (single) stock static_vectors layer for ``new``, wherever it sits."""
    for node in model.walk():
        for i, child in enumerate(node.layers):
            if child.name == STATIC_VECTORS:
                node.layers[i] = new
                return True
    return False
