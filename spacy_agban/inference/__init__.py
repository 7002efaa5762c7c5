"""Faster CPU inference with the same (or measured) predictions.

- :mod:`.precision`: one switch, :func:`set_precision` (fp32, bf16, int8), and its
  config callbacks.
- :mod:`.by_length`: the transformer's encoder over rows sorted by length.
- The numpy fast paths of the char BiLSTM and the Viterbi decoder live with the
  modules they copy (:mod:`spacy_agban.model`); :func:`reference_inference` switches
  every fast path back to the code it replaces.
"""
from ..model.reference import reference_inference, use_reference
from .precision import PRECISIONS, set_precision

__all__ = ["PRECISIONS", "reference_inference", "set_precision", "use_reference"]
