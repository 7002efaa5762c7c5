"""The transformer pipelines' encoder on ONNX Runtime: ``onnx`` (fp32) and ``onnx-int8``.

ONNX Runtime is built for CPU inference of exported graphs: it plans the whole encoder
once, fuses what it can, and has int8 matrix kernels of its own. Here the loaded
fp32 encoder is exported in memory (``torch.onnx.export``, nothing written next to
the pipeline, nothing downloaded) and replaced, in its spacy-transformers component,
by a module that runs the ONNX Runtime session and hands back the same fields as
the Hugging Face model (fp32 torch tensors): alignment, pooling and the tagger after
it are unchanged. ``onnx-int8`` quantizes the exported graph's matrix products
dynamically (int8 weights, activations per batch), leaving in fp32 the same layers as
the PyTorch int8 path (:func:`~.int8_layers.keeps_fp32`: attention query/key and the
feed-forward output projections), chosen there on dev.

Ways in, as for bf16 and int8: ``set_precision(nlp, "onnx")`` (or ``"onnx-int8"``),
``--precision onnx`` of ``evaluate`` and ``tag``, or the ``[nlp.after_pipeline_creation]``
callbacks ``spacy_agban.onnx_inference.v1`` / ``spacy_agban.onnx_int8_inference.v1``.
Needs the ``onnxruntime`` and ``onnx`` packages (``pip install spacy-agban[onnx]``);
CPU only. Speed and F1 against the PyTorch paths: ``docs/results.md``.
"""
import io
import logging
import re
import warnings
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

#: The encoder's inputs, in the order the exported graph takes them.
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def require_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError(
            "ONNX Runtime inference needs the onnxruntime and onnx packages: "
            "pip install 'spacy-agban[onnx]' (or pip install onnxruntime onnx)."
        ) from err
    return onnxruntime


def export_encoder(hf_model: torch.nn.Module) -> bytes:
    """The Hugging Face encoder as an ONNX graph (bytes): dynamic batch and length,
    every hidden state as an output when its config asks for them."""
    config = hf_model.config
    with_hidden = bool(getattr(config, "output_hidden_states", False))
    n_layers = int(getattr(config, "num_hidden_layers", 0))
    hf_model.eval()
    example = torch.ones((2, 8), dtype=torch.long)
    outputs = ["last_hidden_state"] + ([f"hidden_state_{i}" for i in range(n_layers + 1)] if with_hidden else [])

    class Graph(torch.nn.Module):
        def __init__(self, model: torch.nn.Module):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids, return_dict=True)
            hidden = tuple(out.hidden_states) if with_hidden else ()
            return (out.last_hidden_state,) + hidden

    axes = {name: {0: "batch", 1: "length"} for name in INPUT_NAMES + tuple(outputs)}
    buffer = io.BytesIO()
    # The exporter puts the module it is given back in that module's mode: a wrapper built
    # in training mode would leave the encoder with dropout on after the export.
    graph = Graph(hf_model).eval()
    # the TorchScript exporter (dynamo=False: no onnxscript dependency) warns about its
    # own deprecation and the traced mask constants, which are shape-independent here
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph, (example, example, torch.zeros_like(example)), buffer,
            input_names=list(INPUT_NAMES), output_names=outputs, dynamic_axes=axes,
            opset_version=17, dynamo=False,
        )
    return buffer.getvalue()


def quantized_node_exclusions(model_bytes: bytes) -> List[str]:
    """The MatMul nodes that stay fp32 in ``onnx-int8``: those of the linear layers the
    PyTorch int8 path keeps (named after the module path in the exported graph)."""
    import onnx

    from .int8_layers import keeps_fp32

    graph = onnx.load_from_string(model_bytes).graph
    kept = []
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        # "/model/encoder/layer.0/output/dense/MatMul" -> "encoder.layer.0.output.dense"
        module = re.sub(r"^/(model/)?", "", node.name).rsplit("/", 1)[0].replace("/", ".")
        if keeps_fp32(module):
            kept.append(node.name)
    return kept


def quantize_graph(model_bytes: bytes) -> bytes:
    """Dynamic int8 quantization of the graph's matrix products (the chosen ones fp32)."""
    require_onnxruntime()
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "encoder.onnx", Path(folder) / "encoder.int8.onnx"
        source.write_bytes(model_bytes)
        # the quantizer advises pre-processing on the root logger, meant for static
        # (calibrated) quantization of vision models: not this graph's case
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            quantize_dynamic(
                source, target, weight_type=QuantType.QInt8, per_channel=True,
                nodes_to_exclude=quantized_node_exclusions(model_bytes),
                extra_options={"DefaultTensorType": TensorProto.FLOAT},
            )
        finally:
            root.setLevel(level)
        return target.read_bytes()


class OnnxEncoder(torch.nn.Module):
    """An ONNX Runtime session in the place of a Hugging Face encoder: called with the
    same keyword inputs, it returns the same output class with fp32 tensors."""

    def __init__(self, hf_model: torch.nn.Module, model_bytes: bytes, threads: Optional[int] = None):
        super().__init__()
        ort = require_onnxruntime()
        self.config = hf_model.config
        # one parameter, so that code asking the encoder for its device gets the CPU
        self._anchor = torch.nn.Parameter(torch.zeros(()), requires_grad=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.model_bytes = model_bytes  # the graph the session runs (inspection, tests)
        self.session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_names = {i.name for i in self.session.get_inputs()}

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutput

        if input_ids is None:
            raise ValueError("The ONNX Runtime encoder needs input_ids.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        feed: Dict[str, Any] = {
            name: tensor.detach().cpu().to(torch.long).numpy()
            for name, tensor in zip(INPUT_NAMES, (input_ids, attention_mask, token_type_ids))
            if name in self.input_names
        }
        values = [torch.from_numpy(v) for v in self.session.run(self.output_names, feed)]
        hidden: Optional[Sequence[torch.Tensor]] = tuple(values[1:]) if len(values) > 1 else None
        return BaseModelOutput(last_hidden_state=values[0], hidden_states=hidden)


def onnx_encoder(hf_model: torch.nn.Module, quantize: bool) -> OnnxEncoder:
    if next(hf_model.parameters()).device.type != "cpu":
        raise ValueError("ONNX Runtime inference runs on CPU here: load the pipeline on CPU.")
    graph = export_encoder(hf_model)
    return OnnxEncoder(hf_model, quantize_graph(graph) if quantize else graph)
