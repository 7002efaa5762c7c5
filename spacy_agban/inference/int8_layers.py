"""Which linear layers of a BERT-style encoder int8 leaves in fp32: one rule for the
PyTorch int8 path (``precision.py``) and ONNX Runtime's (``onnx_runtime.py``)."""

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
