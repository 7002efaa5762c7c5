"""Thinc's PyTorch shim with an optimizer step that keeps each parameter's tensor.

thinc 8.3's ``PyTorchShim.finish_update`` does, for every parameter and every step,
``param.data = xp2torch(optimizer(key, torch2xp(param.data), ...)[0])``: the new
``param.data`` is a DLPack tensor over a numpy view of the *previous* ``param.data``,
which it keeps alive. Nothing in that chain is ever freed: each training step adds
one tensor and a few numpy views per parameter (same storage, ~20 KB a step for
AGBAN's 40-odd parameters). Measured with ``python -m benchmarks.memory probe``, that small
leak is the cause of the unbounded RSS growth of training: the leaked objects are
allocated every step between the step's large short-lived tensor buffers, so
glibc's heap can neither reuse nor give back the holes (freed-but-kept heap memory
grew ~270 MB per 1000 steps, forward-only loops stay flat). Where the small objects
land depends on the run (allocation order, hash seed, neighbours), hence "sometimes".

:class:`InPlaceUpdateShim` writes the optimizer's result into the parameter instead
(Thinc's Adam already updates the numpy view in place, so usually nothing is
copied), with the same optimizer keys, gradient clipping, loss scaling and
serialization as the stock shim.

It also makes ``[training.optimizer] use_averages = true`` work for PyTorch models:
thinc's optimizer keeps its parameter averages under the keys ``finish_update``
passes, ``(shim id, parameter name)``, but the stock ``PyTorchShim.use_params`` looks
for ``"pytorch_{id}_{name}"`` strings, finds none and silently keeps the raw weights,
so spaCy evaluated and saved the un-averaged model.
"""
import contextlib
from typing import Callable, Dict, Iterator

import torch
from spacy.language import Language
from spacy.util import registry
from thinc.api import Model, PyTorchShim
from thinc.util import torch2xp, xp2torch

from ..model.reference import use_reference


class InPlaceUpdateShim(PyTorchShim):
    """``PyTorchShim`` whose ``finish_update`` never rebinds ``param.data``.

    Its ``predict`` runs under ``torch.inference_mode`` (no autograd bookkeeping at
    all, cheaper per op than ``no_grad``: it counts when a post is tagged alone).
    """

    def predict(self, inputs):
        if use_reference() or self._mixed_precision:
            return super().predict(inputs)
        # Left in eval mode: switching a module tree back and forth costs more than a
        # tweet's CRF; every training forward (begin_update) sets train mode itself.
        if self._model.training:
            self._model.eval()
        with torch.inference_mode():
            return self._model(*inputs.args, **inputs.kwargs)

    def finish_update(self, optimizer) -> None:
        for name, param in self._model.named_parameters():
            if param.grad is None:
                continue
            if not self._grad_scaler.found_inf:  # skip the step if a gradient overflowed
                weights, _ = optimizer((self.id, name), torch2xp(param.data), torch2xp(param.grad))
                updated = xp2torch(weights, device=param.device)
                if updated.data_ptr() != param.data_ptr():  # the optimizer made a new array
                    with torch.no_grad():
                        param.copy_(updated.view_as(param))
            param.grad.zero_()
        self._grad_scaler.update()
        # thinc's optimizer writes through a numpy view: torch sees no version change,
        # so prediction caches computed from the old weights are dropped here
        self._clear_caches()

    @contextlib.contextmanager
    def use_params(self, params: Dict) -> Iterator[None]:
        """Within the block, the parameters found in ``params`` under this shim's
        optimizer keys (e.g. ``optimizer.averages``) replace the model's, copied in
        place so that nothing holding a parameter sees a stale tensor."""
        named = dict(self._model.named_parameters())
        replacements = {name: params[(self.id, name)] for name in named if (self.id, name) in params}
        if not replacements:  # the stock shim's string keys, if anyone uses them
            with super().use_params(params):
                yield
            return
        backup: Dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, value in replacements.items():
                param = named[name]
                backup[name] = param.detach().clone()
                param.copy_(xp2torch(value, device=param.device).view_as(param))
        self._clear_caches()
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in backup.items():
                    named[name].copy_(value)
            self._clear_caches()

    def _clear_caches(self) -> None:
        for module in self._model.modules():
            clear = getattr(module, "clear_cache", None)
            if callable(clear):
                clear()


def _in_place_hf_shim() -> type:
    """:class:`InPlaceUpdateShim`'s update for spacy-transformers' ``HFShim`` (which
    keeps thinc's ``finish_update``, and so the same leak, for the transformer's
    parameters); its own (de)serialization is kept."""
    global _IN_PLACE_HF_SHIM
    if _IN_PLACE_HF_SHIM is None:
        from spacy_transformers.layers.hf_shim import HFShim

        _IN_PLACE_HF_SHIM = type("InPlaceUpdateHFShim", (InPlaceUpdateShim, HFShim), {
            "__doc__": "spacy-transformers' HFShim with InPlaceUpdateShim's update and predict.",
        })
    return _IN_PLACE_HF_SHIM


_IN_PLACE_HF_SHIM = None


def with_in_place_updates(model: Model) -> Model:
    """Make every stock PyTorch shim of ``model`` and its layers update in place.

    ``PyTorchShim`` becomes :class:`InPlaceUpdateShim`, spacy-transformers' ``HFShim``
    its in-place twin: subclasses that add no state, so the shim keeps its model,
    optimizer keys and serialization.
    """
    for node in model.walk():
        for shim in node.shims:
            if type(shim) is PyTorchShim:
                shim.__class__ = InPlaceUpdateShim
            elif type(shim).__name__ == "HFShim" and type(shim).__module__.startswith("spacy_transformers"):
                shim.__class__ = _in_place_hf_shim()
    return model


@registry.callbacks("spacy_agban.in_place_updates.v1")
def make_in_place_updates() -> Callable[[Language], Language]:
    """``[nlp.after_pipeline_creation]`` callback: every PyTorch shim of the pipeline
    (a stock ``spacy-transformers.TransformerModel.v3`` included) updates in place."""

    def after_pipeline_creation(nlp: Language) -> Language:
        for _, pipe in nlp.pipeline:
            model = getattr(pipe, "model", None)
            if isinstance(model, Model):
                with_in_place_updates(model)
        return nlp

    return after_pipeline_creation
