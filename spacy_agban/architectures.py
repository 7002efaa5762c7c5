"""Thinc glue: the registered AGBAN architecture around the torch module."""
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from spacy.tokens import Doc
from spacy.util import registry
from thinc.api import ArgsKwargs, Model, PyTorchWrapper_v3, get_torch_default_device
from thinc.types import Floats2d

from .layers.featurize import N_CHARS, N_SHAPES, Featurizer
from .model import AGBANModule, Batch
from .model.agban import Output
from .layers.shim import with_in_place_updates
from .units.base import DocUnits

# (docs, their visual units, gold tags or None[, a teacher's tag marginals per doc (n, n_tags)
# or None per doc: training with distill > 0 only)]
AGBANInput = Tuple[Any, ...]


@registry.architectures("spacy_agban.AGBAN.v3")
def build_agban_model(
    fusion: str = "gban",
    adversarial: bool = True,
    grl_lambda: float = 1.0,
    use_word_features: bool = True,
    word_dim: int = 50,
    char_dim: int = 30,
    char_hidden: int = 50,
    shape_dim: int = 0,
    hidden: int = 200,
    gban_dim: int = 200,
    gate_dim: int = 200,
    discriminator_hidden: int = 200,
    dropout: float = 0.5,
    max_word_chars: int = 20,
    visual_dropout: float = 0.0,
    source_dropout: float = 0.0,
    cross_view: float = 0.0,
    adversarial_reduction: str = "mean",
    grl_warmup_steps: int = 0,
    distill: float = 0.0,
    token_encoder: Optional[Model[List[Doc], List[Floats2d]]] = None,
    mixed_precision: bool = False,
) -> Model[AGBANInput, Output]:
    """AGBAN (Zheng et al. 2020) as a Thinc model over (docs, visual units, gold tags).

    The one version of the architecture (the package is unreleased: no saved
    pipeline names another). With the defaults it is the paper's model.

    fusion: "none" (BiLSTM-CRF), "concat", "ban" or "gban" (Table III rows).
    adversarial: the modality discriminator behind a gradient reversal layer.
    use_word_features: the paper's word features (GloVe + a trainable table); false
        with char_dim = 0 leaves the token_encoder as the only token features.
    shape_dim: width of an embedding of each token's shape (case of its letters, an
        @ or # prefix) beside the word and char features; 0 (the paper) leaves it out.
    token_encoder: optional extra token features (e.g. a spacy-transformers listener),
        concatenated to the word and char features before the word BiLSTM.
    Training for posts without visual context (docs/visual_context.md), all off by
    default (the paper's training); none of them acts at prediction time:
    visual_dropout: probability that a training doc's units are all masked (the
        text path alone must tag it).
    source_dropout: probability that one source (objects, caption) of a training doc
        with several is masked.
    cross_view: weight of KL(multimodal || text-only) between the two views' CRF tag
        marginals (ITA's cross-view alignment); 0 turns it off.
    adversarial_reduction: "mean" (the paper) or "sum" (on the CRF loss's scale).
    grl_warmup_steps: DANN's schedule for the GRL weight, rising from 0 to
        grl_lambda over that many training steps; 0 = grl_lambda throughout.
    The torch module is built in ``initialize``, once the pipe has set the sizes that
    depend on data (tags, training vocabulary, vector width, unit sources).
    """
    if not use_word_features and not char_dim and token_encoder is None:
        raise ValueError(
            "spacy_agban.AGBAN needs token features: use_word_features, char_dim > 0 or a "
            "token_encoder"
        )
    # every setting by name, as agban_init hands it to the torch module; dropout_rate is
    # what thinc's set_dropout_rate (called by the pipe's update with its drop) sets:
    # the rate the next training forward uses, ``dropout`` until then
    attrs: Dict[str, Any] = {
        "fusion": fusion,
        "adversarial": adversarial,
        "grl_lambda": grl_lambda,
        "use_word_features": use_word_features,
        "word_dim": word_dim,
        "char_dim": char_dim,
        "char_hidden": char_hidden,
        "shape_dim": shape_dim,
        "hidden": hidden,
        "gban_dim": gban_dim,
        "gate_dim": gate_dim,
        "discriminator_hidden": discriminator_hidden,
        "dropout": dropout,
        "max_word_chars": max_word_chars,
        "visual_dropout": visual_dropout,
        "source_dropout": source_dropout,
        "cross_view": cross_view,
        "adversarial_reduction": adversarial_reduction,
        "grl_warmup_steps": grl_warmup_steps,
        "distill": distill,
        "mixed_precision": mixed_precision,
        "sizes": None,
        "featurizer": None,
        "dropout_rate": dropout,
    }
    layers = [token_encoder] if token_encoder is not None else []
    model: Model = Model("agban", agban_forward, init=agban_init, layers=layers, attrs=attrs)
    if token_encoder is not None:
        model.set_ref("token_encoder", token_encoder)
    return model


def set_sizes(model: Model, sizes: Dict[str, Any]) -> None:
    """Sizes known from data: n_tags, words, static_width, unit_dims (the pipe's cfg)."""
    model.attrs["sizes"] = sizes


def agban_init(model: Model, X: Optional[AGBANInput] = None, Y: Any = None) -> Model:
    sizes = model.attrs["sizes"]
    if sizes is None:
        raise ValueError(
            "The agban model has no sizes yet: initialize it through the pipe "
            "(nlp.initialize) or load a trained pipeline with spacy.load."
        )
    encoder = model.get_ref("token_encoder") if model.has_ref("token_encoder") else None
    external_width = 0
    if encoder is not None:
        encoder.initialize(X=X[0] if X is not None else None)
        external_width = encoder.get_dim("nO")
    a = model.attrs
    words_on = a["use_word_features"]
    module = AGBANModule(
        n_tags=sizes["n_tags"],
        n_words=len(sizes["words"]) + 1 if words_on else 1,
        static_width=sizes["static_width"] if words_on else 0,
        word_dim=(sizes["static_width"] or a["word_dim"]) if words_on else 0,
        n_chars=N_CHARS,
        char_dim=a["char_dim"],
        char_hidden=a["char_hidden"],
        hidden=a["hidden"],
        unit_dims=sizes["unit_dims"] if a["fusion"] != "none" else {},
        fusion=a["fusion"],
        adversarial=a["adversarial"],
        grl_lambda=a["grl_lambda"],
        gban_dim=a["gban_dim"],
        gate_dim=a["gate_dim"],
        discriminator_hidden=a["discriminator_hidden"],
        dropout=a["dropout"],
        external_width=external_width,
        visual_dropout=a["visual_dropout"],
        source_dropout=a["source_dropout"],
        cross_view=a["cross_view"],
        adversarial_reduction=a["adversarial_reduction"],
        grl_warmup_steps=a["grl_warmup_steps"],
        shape_dim=a["shape_dim"],
        n_shapes=N_SHAPES,
        distill=a["distill"],
    )
    model.attrs["featurizer"] = Featurizer(
        sizes["words"] if words_on else [], sizes["static_width"] if words_on else 0,
        sizes["unit_dims"], a["max_word_chars"], shapes=a["shape_dim"] > 0,
    )
    # in-place optimizer steps: thinc's own shim leaks a tensor per parameter per step,
    # which fragments the heap until RSS grows without bound (see shim.py)
    wrapper = with_in_place_updates(PyTorchWrapper_v3(
        module,
        convert_inputs=_convert_inputs,
        convert_outputs=_convert_outputs,
        mixed_precision=a["mixed_precision"],
        serialize_model=_serialize_module,
        deserialize_model=_deserialize_module,
    ))
    if model.has_ref("torch"):  # re-initialization: replace the old module
        model._layers[-1] = wrapper
    else:
        model._layers.append(wrapper)
    model.set_ref("torch", wrapper)
    return model


def get_module(model: Model) -> AGBANModule:
    return model.get_ref("torch").shims[0]._model


def agban_forward(model: Model, X: AGBANInput, is_train: bool) -> Tuple[Output, Callable]:
    docs, units, tags = X[:3]
    teacher = X[3] if len(X) > 3 else None
    external, backprop_encoder = None, None
    if model.has_ref("token_encoder"):
        external, backprop_encoder = model.get_ref("token_encoder")(docs, is_train)
    arrays = model.attrs["featurizer"](docs, units, tags)
    arrays["external"] = _pad(external) if external is not None else None
    arrays["teacher"] = _pad_targets(teacher, docs) if teacher is not None and is_train else None
    if is_train:
        get_module(model).set_dropout(model.attrs["dropout_rate"])
    out, backprop_torch = model.get_ref("torch")(arrays, is_train)

    def backprop(_: Any) -> List[Doc]:
        d_external = backprop_torch(None)
        if backprop_encoder is not None:
            d_padded = d_external.detach().cpu().numpy()
            backprop_encoder([d_padded[i, : len(doc)] for i, doc in enumerate(docs)])
        return []

    return out, backprop


def _pad(per_doc: Sequence[Floats2d]) -> numpy.ndarray:
    rows = [numpy.asarray(getattr(x, "get", lambda: x)()) for x in per_doc]
    out = numpy.zeros((len(rows), max(len(r) for r in rows), rows[0].shape[1]), dtype="float32")
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _pad_targets(per_doc: Sequence[Optional[numpy.ndarray]], docs: Sequence[Doc]) -> Optional[numpy.ndarray]:
    """(B, T, n_tags) float32, zeros where a doc has no targets (and on padding)."""
    given = [t for t in per_doc if t is not None]
    if not given:
        return None
    out = numpy.zeros((len(docs), max(len(d) for d in docs), given[0].shape[1]), dtype="float32")
    for i, targets in enumerate(per_doc):
        if targets is not None:
            out[i, : len(targets)] = targets
    return out


def _convert_inputs(model: Model, arrays: Dict[str, Any], is_train: bool):
    device = get_torch_default_device()

    def tensor(value: Any) -> Optional[torch.Tensor]:
        return None if value is None else torch.from_numpy(value).to(device)

    batch = Batch(
        word_ids=tensor(arrays["word_ids"]),
        static_vectors=tensor(arrays["static_vectors"]),
        char_ids=tensor(arrays["char_ids"]),
        char_lengths=tensor(arrays["char_lengths"]),
        token_mask=tensor(arrays["token_mask"]),
        units={s: tensor(v) for s, v in arrays["units"].items()},
        unit_masks={s: tensor(v) for s, v in arrays["unit_masks"].items()},
        tags=tensor(arrays["tags"]) if is_train else None,
        outside_only=tensor(arrays["outside_only"]),
        token_keys=tensor(arrays.get("token_keys")),
        shape_ids=tensor(arrays.get("shape_ids")),
        teacher=tensor(arrays.get("teacher")) if is_train else None,
    )
    external = tensor(arrays["external"])
    if external is not None and is_train:
        external.requires_grad_(True)
    # external travels as its own kwarg so the shim unscales and returns its gradient
    kwargs = {"external": external, "decode": not is_train}
    return ArgsKwargs(args=(batch,), kwargs=kwargs), lambda d: d.kwargs["external"]


def _convert_outputs(model: Model, inputs_outputs: Tuple[Any, Output], is_train: bool):
    _, out = inputs_outputs

    def get_d_torch(_: Any) -> ArgsKwargs:
        # CRF loss - adversarial loss: the discriminator minimizes its loss, the GRL
        # inside the module makes the projectors maximize it (eq. 25); plus the
        # weighted cross-view KL (zero when cross_view = 0), and the weighted KL to a
        # teacher's marginals (zero when distill = 0).
        total = out.crf_loss + out.adversarial_loss + out.cross_view_loss
        if out.distill_loss is not None:
            total = total + out.distill_loss
        return ArgsKwargs(args=(total,), kwargs={"grad_tensors": (torch.ones_like(total),)})

    return out, get_d_torch


def _serialize_module(module: torch.nn.Module) -> bytes:
    return save_safetensors({k: v.contiguous() for k, v in module.state_dict().items()})


def _deserialize_module(module: torch.nn.Module, data: bytes, device: torch.device) -> Any:
    # safetensors: loading model files never runs code from them
    module.load_state_dict(load_safetensors(data))
    module.to(device)
    return module

