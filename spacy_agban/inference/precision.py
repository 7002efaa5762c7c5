"""Lower-precision inference for the transformer pipelines: bf16 and int8, behind one
switch, :func:`set_precision` (``--precision`` of ``evaluate`` and ``tag``).

The encoder's matrix products are ~90% of a transformer pipeline's CPU time
(``docs/profile.md``). bf16 runs the whole Hugging Face encoder in bfloat16 (weights
and activations; its output is handed back in fp32, so everything after the encoder
is unchanged): on a CPU with native bf16 matrix products (AVX512-BF16 or AMX) they
run at about twice the fp32 rate, and a bf16 model has as many mantissa bits as it
needs for tagging (dev and test F1 in ``docs/profile.md``). Without native bf16 the
products are emulated and slower than fp32: a warning says so.

Both paths are inference only: a converted component refuses to be trained or saved
(save the fp32 pipeline, convert at load). Two ways in, after the weights are loaded:

- at load: ``nlp = to_bf16(spacy.load(path))`` (``set_precision(nlp, "bf16")``), or
  ``--precision bf16`` of ``python -m spacy_agban evaluate`` and ``tag``;
- in the config: ``[nlp.after_pipeline_creation] @callbacks =
  "spacy_agban.bf16_inference.v1"`` (or ``spacy.load(path, config={"nlp":
  {"after_pipeline_creation": {"@callbacks": "spacy_agban.bf16_inference.v1"}}})``).
"""
import warnings
from typing import Any, Callable, List, Optional, Set

import torch
from spacy.language import Language
from spacy.util import registry

from .int8_layers import keeps_fp32

Transformer = Any  # spacy_transformers.Transformer, imported only where used (heavy)


PRECISIONS = ("fp32", "bf16", "int8", "onnx", "onnx-int8")


def set_precision(nlp: Language, precision: str) -> Language:
    """The loaded pipeline's transformer components in ``precision`` (fp32: unchanged)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16":
        return to_bf16(nlp)
    if precision == "int8":
        return quantize_int8(nlp)
    if precision in ("onnx", "onnx-int8"):
        return to_onnx(nlp, quantize=precision == "onnx-int8")
    return nlp


def transformer_components(nlp: Language) -> List[Transformer]:
    from spacy_transformers import Transformer as TransformerPipe

    return [pipe for _, pipe in nlp.pipeline if isinstance(pipe, TransformerPipe)]


def checked_transformer_components(nlp: Language, precision: str) -> List[Transformer]:
    pipes = transformer_components(nlp)
    if not pipes:
        raise ValueError(
            f"{precision} inference converts a transformer component, and this pipeline has none "
            f"(components: {', '.join(nlp.pipe_names)})."
        )
    return pipes


def encoder_of(pipe: Transformer) -> torch.nn.Module:
    """The Hugging Face model inside a spacy-transformers component."""
    return pipe.model.layers[0].shims[0]._model


def make_inference_only(pipe: Transformer, precision: str) -> None:
    """A converted component cannot be trained or saved: its weights are no longer the
    fp32 ones its config and optimizer expect."""

    def refuse(*args, **kwargs):
        raise ValueError(
            f"The '{pipe.name}' component runs {precision} for inference only: it cannot be saved "
            f"or trained. Save or train the fp32 pipeline and convert it to {precision} at load."
        )

    for method in ("to_disk", "to_bytes", "update", "finish_update"):
        setattr(pipe, method, refuse)


def component_converter(
    precision: str, convert_encoder: Callable[[torch.nn.Module], Optional[torch.nn.Module]]
) -> Callable[[Transformer], None]:
    """A function converting one component's encoder with ``convert_encoder``, in place
    or by the module it returns (once: converting again is a no-op, from another lower
    precision an error)."""

    def convert(pipe: Transformer) -> None:
        current = getattr(pipe, "precision", "fp32")
        if current == precision:
            return
        if current != "fp32":
            raise ValueError(f"The '{pipe.name}' component already runs {current}: convert the fp32 pipeline.")
        encoder = encoder_of(pipe)
        encoder.eval()
        replacement = convert_encoder(encoder)
        if replacement is not None:
            pipe.model.layers[0].shims[0]._model = replacement
        pipe.precision = precision
        make_inference_only(pipe, precision)

    return convert


def convert_pipeline(nlp: Language, precision: str, convert: Callable[[Transformer], None]) -> Language:
    for pipe in checked_transformer_components(nlp, precision):
        convert(pipe)
    return nlp


def after_loading_callback(precision: str, convert: Callable[[Transformer], None]) -> Callable[[Language], Language]:
    """An ``[nlp.after_pipeline_creation]`` callback: each transformer component is
    converted each time it has loaded its weights (a converted model cannot load fp32
    weights, and ``after_pipeline_creation`` runs before loading)."""

    def after_pipeline_creation(nlp: Language) -> Language:
        for pipe in checked_transformer_components(nlp, precision):
            for method in ("from_disk", "from_bytes"):
                load = getattr(pipe, method)

                def load_then_convert(*args, _load=load, _pipe=pipe, **kwargs):
                    loaded = _load(*args, **kwargs)
                    convert(_pipe)
                    return loaded

                setattr(pipe, method, load_then_convert)
        return nlp

    return after_pipeline_creation


def native_bf16() -> Optional[bool]:
    """Whether this CPU multiplies bf16 matrices natively (None: cannot tell)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


def _outputs_to_fp32(module: torch.nn.Module, inputs: Any, output: Any) -> Any:
    """Forward hook: the encoder's floating outputs back in fp32, so that the alignment,
    pooling and the tagger after it run as they do for an fp32 encoder."""
    for key in list(output.keys()):
        value = output[key]
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            output[key] = value.float()
        elif isinstance(value, tuple):  # per-layer hidden states or attentions
            output[key] = tuple(t.float() if t.is_floating_point() else t for t in value)
    return output


def _encoder_to_bf16(encoder: torch.nn.Module) -> None:
    if next(encoder.parameters()).device.type == "cpu" and native_bf16() is False:
        warnings.warn(
            "This CPU has no native bf16 matrix products (AVX512-BF16 or AMX): bf16 inference "
            "is emulated here and slower than fp32.",
            stacklevel=4,
        )
    encoder.to(torch.bfloat16)
    encoder.register_forward_hook(_outputs_to_fp32)


bf16_component = component_converter("bf16", _encoder_to_bf16)


def to_bf16(nlp: Language) -> Language:
    """The transformer components of a loaded pipeline in bf16 (in place); returns ``nlp``."""
    return convert_pipeline(nlp, "bf16", bf16_component)


@registry.callbacks("spacy_agban.bf16_inference.v1")
def make_bf16_inference() -> Callable[[Language], Language]:
    """``[nlp.after_pipeline_creation]`` callback: each transformer component converts
    its encoder to bf16 as soon as it has loaded its weights."""
    return after_loading_callback("bf16", bf16_component)


# ----- int8 ---------------------------------------------------------------------------
# PyTorch's dynamic quantization of the encoder's nn.Linear layers (all but those
# keeps_fp32 keeps): int8 weights, activations quantized per batch on the fly. CPU only;
# predictions change a little (dev/test F1 against fp32: docs/profile.md). Ways in as for
# bf16: set_precision(nlp, "int8"), --precision int8, or the config callback
# spacy_agban.int8_inference.v1. bf16 keeps F1 where int8 loses some, and is faster on a
# CPU with native bf16.


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


# ----- ONNX Runtime ---------------------------------------------------------------------
# The encoder exported to ONNX at load and run by ONNX Runtime (onnx_runtime.py); "onnx"
# keeps fp32, "onnx-int8" quantizes the graph's matrix products as the int8 path does.


def _onnx_converter(quantize: bool) -> Callable[[Transformer], None]:
    from .onnx_runtime import onnx_encoder

    return component_converter("onnx-int8" if quantize else "onnx",
                               lambda encoder: onnx_encoder(encoder, quantize))


def to_onnx(nlp: Language, quantize: bool = False) -> Language:
    """The transformer components of a loaded pipeline on ONNX Runtime (in place)."""
    from .onnx_runtime import require_onnxruntime

    require_onnxruntime()
    precision = "onnx-int8" if quantize else "onnx"
    return convert_pipeline(nlp, precision, _onnx_converter(quantize))


@registry.callbacks("spacy_agban.onnx_inference.v1")
def make_onnx_inference() -> Callable[[Language], Language]:
    """``[nlp.after_pipeline_creation]`` callback: each transformer component runs its
    encoder on ONNX Runtime (fp32) once it has loaded its weights."""
    return after_loading_callback("onnx", _onnx_converter(False))


@registry.callbacks("spacy_agban.onnx_int8_inference.v1")
def make_onnx_int8_inference() -> Callable[[Language], Language]:
    """``[nlp.after_pipeline_creation]`` callback: ONNX Runtime with int8 matrix products."""
    return after_loading_callback("onnx-int8", _onnx_converter(True))
