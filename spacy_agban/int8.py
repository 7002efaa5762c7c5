"""Opt-in int8 CPU inference for the transformer pipelines.

PyTorch's dynamic quantization (``torch.ao.quantization.quantize_dynamic``) of the
transformer's ``nn.Linear`` layers (all but the few :func:`keeps_fp32` keeps): weights stored as int8, activations quantized
per batch on the fly. The encoder's matrix products are ~90% of a transformer
pipeline's CPU time (``docs/profile.md``), and they are what this speeds up.
Predictions change a little: the F1 of both evaluation columns against fp32 is in
``docs/profile.md`` (measured with ``benchmarks/int8_quality.py``).

Two ways in, both after the weights are loaded (quantized modules cannot load fp32
weights):

- at load: ``nlp = quantize_int8(spacy.load(path))``, or
  ``python -m spacy_agban evaluate MODEL DATA --int8``;
- in the config: ``[nlp.after_pipeline_creation] @callbacks =
  "spacy_agban.int8_inference.v1"`` (or ``spacy.load(path, config={"nlp":
  {"after_pipeline_creation": {"@callbacks": "spacy_agban.int8_inference.v1"}}})``):
  each transformer component quantizes itself right after it loads its weights.

Inference only, on CPU: a quantized component cannot be trained or saved (save the
fp32 pipeline, quantize at load).
"""
from typing import Any, Callable, List, Set

import torch
from spacy.language import Language
from spacy.util import registry

Transformer = Any  # spacy_transformers.Transformer, imported only where used (heavy)


def transformer_components(nlp: Language) -> List[Transformer]:
    from spacy_transformers import Transformer as TransformerPipe

    return [pipe for _, pipe in nlp.pipeline if isinstance(pipe, TransformerPipe)]


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


def quantize_component(pipe: Transformer) -> None:
    """Dynamic int8 quantization of the component's ``nn.Linear`` layers, in place."""
    if getattr(pipe, "is_int8", False):
        return
    shim = pipe.model.layers[0].shims[0]
    hf_model = shim._model
    if next(hf_model.parameters()).device.type != "cpu":
        raise ValueError("int8 inference (dynamic quantization) runs on CPU only: load the pipeline on CPU.")
    hf_model.eval()
    names = quantized_linear_names(hf_model)
    torch.ao.quantization.quantize_dynamic(hf_model, names, dtype=torch.qint8, inplace=True)
    pipe.is_int8 = True  # type: ignore[attr-defined]

    def refuse(*args, **kwargs):
        raise ValueError(
            f"The '{pipe.name}' component runs int8 (dynamically quantized) for inference only: "
            "it cannot be saved or trained. Save or train the fp32 pipeline and quantize it at load."
        )

    for method in ("to_disk", "to_bytes", "update", "finish_update"):
        setattr(pipe, method, refuse)


def quantize_int8(nlp: Language) -> Language:
    """Quantize the transformer components of a loaded pipeline (in place); returns ``nlp``."""
    pipes = transformer_components(nlp)
    if not pipes:
        raise ValueError(
            "int8 inference quantizes a transformer component, and this pipeline has none "
            f"(components: {', '.join(nlp.pipe_names)})."
        )
    for pipe in pipes:
        quantize_component(pipe)
    return nlp


@registry.callbacks("spacy_agban.int8_inference.v1")
def make_int8_inference() -> Callable[[Language], Language]:
    """``[nlp.after_pipeline_creation]`` callback: each transformer component is
    quantized as soon as it has loaded its weights (``from_disk`` / ``from_bytes``)."""

    def after_pipeline_creation(nlp: Language) -> Language:
        pipes = transformer_components(nlp)
        if not pipes:
            raise ValueError("spacy_agban.int8_inference.v1: the pipeline has no transformer component.")
        for pipe in pipes:
            _quantize_after_loading(pipe)
        return nlp

    return after_pipeline_creation


def _quantize_after_loading(pipe: Transformer) -> None:
    for method in ("from_disk", "from_bytes"):
        load = getattr(pipe, method)

        def load_then_quantize(*args, _load=load, **kwargs):
            loaded = _load(*args, **kwargs)
            quantize_component(pipe)
            return loaded

        setattr(pipe, method, load_then_quantize)
