"""Prediction-time shortcuts that give the same predictions for less work.

- :func:`encode_by_length`: the transformer's encoder run on the word-piece rows
  sorted by length, in small sub-batches cut to their own longest row, under
  ``torch.inference_mode``. A batch of tweets with captions is ~25% padding when
  padded to its longest row; the encoder's matrix products are ~90% of the
  transformer pipeline's time (``docs/profile.md``), so padding is work nobody reads.
- :func:`mean_of_last_layers`: the mean of the encoder's last hidden states.

The switch back to the code paths these shortcuts replace is
:func:`spacy_agban.model.reference.reference_inference` (re-exported by this package).
"""
from typing import Any, Dict, List, Tuple

import numpy
import torch

# padded word pieces per encoder call on CPU: large enough for efficient matrix products
# on one core, small enough that rows of a sub-batch have similar lengths
CPU_PIECES_PER_CALL = 1024
GPU_PIECES_PER_CALL = 16384


def length_batches(lengths: numpy.ndarray, max_pieces: int) -> List[numpy.ndarray]:
    """Row indices grouped by length (shortest first), each group's rows x longest
    row at most ``max_pieces`` (a single longer row gets a group of its own)."""
    order = numpy.argsort(lengths, kind="stable")
    groups: List[numpy.ndarray] = []
    start = 0
    for end in range(1, len(order) + 1):
        if end == len(order) or (end - start + 1) * int(lengths[order[end]]) > max_pieces:
            groups.append(order[start:end])
            start = end
    return groups


def encode_by_length(
    hf_model: torch.nn.Module, wordpieces, max_pieces: int = 0, mean_last_layers: int = 1
) -> Any:
    """The Hugging Face model's output for a ``WordpieceBatch``, computed by length.

    Same fields and shapes as one call on the whole padded batch; the rows are the same
    up to float rounding (an attention mask keeps padding out of every real piece's
    result, so cutting padding changes nothing else). Padding positions hold zeros
    (the alignment never reads them). Needs right padding; a left-padded batch is
    encoded in one call.

    mean_last_layers > 1: the output is ``last_hidden_state`` alone, the mean of the
    last that many hidden states (:func:`mean_of_last_layers`), taken per sub-batch.
    """
    device = next(hf_model.parameters()).device
    if not max_pieces:
        max_pieces = CPU_PIECES_PER_CALL if device.type == "cpu" else GPU_PIECES_PER_CALL
    inputs: Dict[str, numpy.ndarray] = {
        "input_ids": wordpieces.input_ids, "attention_mask": wordpieces.attention_mask,
    }
    if wordpieces.token_type_ids is not None:
        inputs["token_type_ids"] = wordpieces.token_type_ids
    inputs = {k: numpy.asarray(getattr(v, "get", lambda v=v: v)()) for k, v in inputs.items()}
    mask = inputs["attention_mask"]
    n_rows, width = mask.shape
    lengths = mask.sum(axis=1)
    right_padded = bool((mask == (numpy.arange(width)[None, :] < lengths[:, None])).all())
    config = getattr(hf_model, "config", None)
    # per-layer outputs other than the mean are not merged by row: one call then
    per_layer = bool(
        getattr(config, "output_attentions", False)
        or (getattr(config, "output_hidden_states", False) and mean_last_layers <= 1)
    )
    whole = not right_padded or n_rows <= 1 or per_layer
    was_training = hf_model.training
    hf_model.eval()
    try:
        with torch.inference_mode():
            if whole:
                output = hf_model(**{k: torch.from_numpy(v).to(device) for k, v in inputs.items()})
                return mean_of_last_layers(output, mean_last_layers)
            parts = []
            for rows in length_batches(lengths, max_pieces):
                longest = max(1, int(lengths[rows].max()))
                part = mean_of_last_layers(hf_model(**{
                    k: torch.from_numpy(numpy.ascontiguousarray(v[rows, :longest])).to(device)
                    for k, v in inputs.items()
                }), mean_last_layers)
                parts.append((torch.from_numpy(rows).to(device), longest, part))
            return _merge(parts, n_rows, width)
    finally:
        hf_model.train(was_training)


def mean_of_last_layers(output: Any, n: int) -> Any:
    """The model output with ``last_hidden_state`` the mean of the last ``n`` hidden states
    (and no other field); ``n`` <= 1: the output unchanged.

    The last layers of a sentence-embedding encoder are tuned for the pooled sentence
    vector; the layers below keep more of each word (the feature-based BERT tagger used
    the last four). Needs ``output_hidden_states`` in the model's config.
    """
    if n <= 1:
        return output
    hidden = getattr(output, "hidden_states", None)
    if hidden is None:
        raise ValueError(
            "mean_last_layers > 1 needs the encoder's hidden states: set "
            "output_hidden_states = true in the transformer_config."
        )
    if n > len(hidden):
        raise ValueError(
            f"mean_last_layers = {n}, but the encoder gives {len(hidden)} hidden states "
            "(its layers and the embeddings)."
        )
    from transformers.modeling_outputs import BaseModelOutput  # only the transformer path needs it

    return BaseModelOutput(last_hidden_state=torch.stack(hidden[-n:]).mean(dim=0))


def _merge(parts: List[Tuple[torch.Tensor, int, Any]], n_rows: int, width: int) -> Any:
    """One model output for the whole batch from the sub-batches' outputs, in row order:
    ``last_hidden_state`` padded to ``width`` with zeros, other tensors by row."""
    merged: Dict[str, torch.Tensor] = {}
    for rows, longest, part in parts:
        for key, value in part.items():
            if key == "last_hidden_state":
                if key not in merged:
                    merged[key] = value.new_zeros((n_rows, width) + tuple(value.shape[2:]))
                merged[key][rows, :longest] = value
            else:
                if key not in merged:
                    merged[key] = value.new_zeros((n_rows,) + tuple(value.shape[1:]))
                merged[key][rows] = value
    return type(parts[0][2])(**merged)
