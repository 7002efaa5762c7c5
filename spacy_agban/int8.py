"""Opt-in int8 CPU inference for the transformer pipelines.

PyTorch's dynamic quantization (``torch.ao.quantization.quantize_dynamic``) of the
transformer's ``nn.Linear`` layers (all but the few :func:`keeps_fp32` keeps): weights stored as int8, activations quantized
per batch on the fly. The encoder's matrix products are ~90% of a transformer
pipeline's CPU time (``docs/profile.md``), and they are what this speeds up.
Predictions change a little: the F1 of both evaluation columns against fp32 is in
``docs/profile.md`` (measured with ``benchmarks/precision_quality.py``).

Two ways in, both after the weights are loaded (quantized modules cannot load fp32
weights):

- at load: ``nlp = quantize_int8(spacy.load(path))``, or ``--precision int8`` of
  ``python -m spacy_agban evaluate`` and ``tag``;
- in the config: ``[nlp.after_pipeline_creation] @callbacks =
  "spacy_agban.int8_inference.v1"`` (or ``spacy.load(path, config={"nlp":
  {"after_pipeline_creation": {"@callbacks": "spacy_agban.int8_inference.v1"}}})``):
  each transformer component quantizes itself right after it loads its weights.

Inference only, on CPU: a quantized component cannot be trained or saved (save the
fp32 pipeline, quantize at load). bf16 (``inference_precision.py``) keeps F1 where int8
loses some, and is faster than this rule on a CPU with native bf16.
"""
from typing import Callable, Set

import torch
from spacy.language import Language
from spacy.util import registry

from .inference_precision import (
    after_loading_callback, component_converter, convert_pipeline, transformer_components,
)

__all__ = ["keeps_fp32", "quantize_int8", "quantized_linear_names", "transformer_components"]

# Linear layers left in fp32 (BERT-style module names). Chosen on the dev split with the
# accurate pipeline (docs/profile.md): quantizing every layer cost 1.9 F1 on dev (mean of
# the two evaluation columns); keeping the feed-forward output projections (which read
# the GELU activations, whose outliers per-tensor int8 rounds badly) and the attention
# query/key projections in fp32 cost 0.4.
FP32_SUFFIXES = ("attention.self.query", "attention.self.key")


def keeps_fp32(name: str) -> bool:
    """Whether the linear layer ``name`` of a BERT-style encoder stays in fp32."""
    ffn_output = name.endswith("output.dense") and "attention" not in name
    return ffn_output or name.endswith(FP32_SUFFIXES)


def quantized_linear_names(hf_model: torch.nn.Module) -> Set[str]:
    """The names of the ``nn.Linear`` layers to quantize: all but those :func:`keeps_fp32` keeps."""
    return {name for name, module in hf_model.named_modules()
            if isinstance(module, torch.nn.Linear) and not keeps_fp32(name)}


def _quantize_encoder(hf_model: torch.nn.Module) -> None:
    if next(hf_model.parameters()).device.type != "cpu":
        raise ValueError("int8 inference (dynamic quantization) runs on CPU only: load the pipeline on CPU.")
    names = quantized_linear_names(hf_model)
    torch.ao.quantization.quantize_dynamic(hf_model, names, dtype=torch.qint8, inplace=True)


# Dynamic int8 quantization of one component's ``nn.Linear`` layers, in place.
quantize_component = component_converter("int8", _quantize_encoder)


def quantize_int8(nlp: Language) -> Language:
    """Quantize the transformer components of a loaded pipeline (in place); returns ``nlp``."""
    return convert_pipeline(nlp, "int8", quantize_component)


@registry.callbacks("spacy_agban.int8_inference.v1")
def make_int8_inference() -> Callable[[Language], Language]:
    """``[nlp.after_pipeline_creation]`` callback: each transformer component is
    quantized as soon as it has loaded its weights (``from_disk`` / ``from_bytes``)."""
    return after_loading_callback("int8", quantize_component)
