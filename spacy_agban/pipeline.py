"""The ``agban`` pipeline component: visual units + AGBAN model -> ``doc.ents``."""
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import numpy
import srsly
from spacy import util
from spacy.language import Language
from spacy.pipeline import TrainablePipe
from spacy.scorer import get_ner_prf
from spacy.tokens import Doc
from spacy.training import Example, iob_to_biluo, biluo_tags_to_spans, validate_get_examples
from spacy.vocab import Vocab
from thinc.api import Config, Model, Optimizer

from .architectures import AGBANInput, set_sizes
from .corpus import patch_stock_corpus
from .extensions import install_extensions
from .learning_rate import ScaledOptimizer
from .visual_units import CAPTION, OBJECT, OBJECT_FEATURE_DIM, DocUnits, ObjectUnitSource

install_extensions()

DEFAULT_CONFIG_STR = """
[model]
@architectures = "spacy_agban.AGBAN.v3"
fusion = "gban"
adversarial = true
grl_lambda = 1.0
use_word_features = true
visual_dropout = 0.3
source_dropout = 0.0
cross_view = 1.0
adversarial_reduction = "mean"
grl_warmup_steps = 0
word_dim = 50
char_dim = 30
char_hidden = 50
hidden = 200
gban_dim = 200
gate_dim = 200
discriminator_hidden = 200
dropout = 0.5
max_word_chars = 20
mixed_precision = false

[caption_units]
@misc = "spacy_agban.CaptionUnits.v1"
top_k = 8
"""
DEFAULT_MODEL = Config().from_str(DEFAULT_CONFIG_STR)["model"]
DEFAULT_CAPTION_UNITS = Config().from_str(DEFAULT_CONFIG_STR)["caption_units"]
OUTSIDE = "O"


@Language.factory(
    "agban",
    assigns=["doc.ents", "token.ent_iob", "token.ent_type", "doc._.visual_units"],
    default_config={
        "model": DEFAULT_MODEL,
        "caption_units": DEFAULT_CAPTION_UNITS,
        "object_units": None,
        "max_words": 50000,
        "record_attention": False,
        "learn_rate_scale": 1.0,
        "scorer": {"@scorers": "spacy.ner_scorer.v1"},
    },
    default_score_weights={"ents_f": 1.0, "ents_p": 0.0, "ents_r": 0.0, "ents_per_type": None},
)
def make_agban(
    nlp: Language,
    name: str,
    model: Model,
    caption_units: Optional[Callable[[Doc], list]],
    object_units: Optional[ObjectUnitSource],
    max_words: int,
    record_attention: bool,
    learn_rate_scale: float,
    scorer: Optional[Callable],
) -> "AGBANRecognizer":
    """Multimodal NER (AGBAN): reads ``doc._.image`` / ``doc._.image_caption``.

    learn_rate_scale: this component's learning rate relative to the optimizer's
    (spaCy has one optimizer for the pipeline): e.g. 20 to train the AGBAN head at
    1e-3 on top of a transformer fine-tuned at 5e-5.
    """
    # `spacy evaluate` reads its data with spaCy's own Corpus after loading the pipeline
    patch_stock_corpus()
    return AGBANRecognizer(
        nlp.vocab, model, name,
        caption_units=caption_units, object_units=object_units, max_words=max_words,
        record_attention=record_attention, learn_rate_scale=learn_rate_scale, scorer=scorer,
    )


def bio_tags(labels: Sequence[str]) -> List[str]:
    return [OUTSIDE] + [f"{prefix}-{label}" for label in labels for prefix in ("B", "I")]


class AGBANRecognizer(TrainablePipe):
    """Sets ``doc.ents`` from the text and the post's visual units.

    cfg holds everything sized by data (labels, training vocabulary, vector width,
    unit sources), so that loading builds the model to that size before the weights,
    and the signature of the detector whose object features the model was trained
    on, so that a loaded model reads only those from a feature store.
    """

    def __init__(
        self,
        vocab: Vocab,
        model: Model,
        name: str = "agban",
        *,
        caption_units: Optional[Callable[[Doc], list]] = None,
        object_units: Optional[ObjectUnitSource] = None,
        max_words: int = 50000,
        record_attention: bool = False,
        learn_rate_scale: float = 1.0,
        scorer: Optional[Callable] = get_ner_prf,
    ):
        if not learn_rate_scale > 0:
            raise ValueError(f"learn_rate_scale must be > 0, got {learn_rate_scale}")
        self.vocab = vocab
        self.model = model
        self.name = name
        self.caption_units = caption_units
        self.object_units = object_units
        self.record_attention = record_attention
        self.learn_rate_scale = learn_rate_scale
        self.scorer = scorer
        self.cfg: Dict[str, Any] = {
            "labels": [], "words": [], "static_width": 0, "unit_dims": {}, "max_words": max_words,
            "object_signature": None,
        }

    # ----- labels and sizes -------------------------------------------------------------
    @property
    def labels(self) -> tuple:
        return tuple(self.cfg["labels"])

    @property
    def tags(self) -> List[str]:
        return bio_tags(self.cfg["labels"])

    @property
    def is_initialized(self) -> bool:
        return self.model.has_ref("torch")

    def add_label(self, label: str) -> int:
        if not isinstance(label, str):
            raise ValueError(f"Entity labels must be strings, got {label!r}")
        if label in self.cfg["labels"]:
            return 0
        if self.is_initialized:
            raise ValueError(
                f"Cannot add label {label!r} to a trained agban component: the CRF is sized "
                "for its labels. Retrain with the new label in the data."
            )
        self.cfg["labels"] = sorted(self.cfg["labels"] + [label])
        return 1

    def _unit_dims(self, static_width: int) -> Dict[str, int]:
        dims = {}
        if self.object_units is not None:
            dims[OBJECT] = OBJECT_FEATURE_DIM
        if self.caption_units is not None:
            # word-vector captions take the vectors' width; an encoder says its own
            width = getattr(self.caption_units, "width", None) or static_width
            if width:
                dims[CAPTION] = int(width)
        return dims

    def _build_model(self) -> None:
        set_sizes(self.model, {
            "n_tags": len(self.tags),
            "words": self.cfg["words"],
            "static_width": self.cfg["static_width"],
            "unit_dims": self.cfg["unit_dims"],
        })

    def initialize(
        self,
        get_examples: Callable[[], Iterable[Example]],
        *,
        nlp: Optional[Language] = None,
        labels: Optional[List[str]] = None,
    ) -> None:
        validate_get_examples(get_examples, "AGBANRecognizer.initialize")
        words: Counter = Counter()
        found = set()
        for eg in get_examples():
            found.update(ent.label_ for ent in eg.reference.ents)
            words.update(token.lower_ for token in eg.reference)
        for label in sorted(labels if labels is not None else found):
            self.add_label(label)
        if not self.cfg["labels"]:
            raise ValueError(
                "agban found no entity labels: the training data has no doc.ents and no "
                "labels were given in [initialize.components.agban]."
            )
        self.cfg["words"] = [w for w, _ in words.most_common(self.cfg["max_words"])]
        self.cfg["static_width"] = int(self.vocab.vectors.shape[1]) if self.vocab.vectors.shape[0] else 0
        self.cfg["unit_dims"] = self._unit_dims(self.cfg["static_width"])
        fusion = self.model.attrs.get("fusion", "none")
        if fusion != "none" and not self.cfg["unit_dims"]:
            raise ValueError(
                f"fusion={fusion!r} needs visual units, but neither caption units (which need "
                "word vectors: set [initialize] vectors) nor object_units are configured."
            )
        self.cfg["object_signature"] = self._object_signature()
        self._build_model()
        sample = [eg.predicted for eg in islice(get_examples(), 10) if len(eg.predicted)]
        self.model.initialize(X=(sample, self.visual_units(sample, store=False), None))

    # ----- visual units -----------------------------------------------------------------
    def _object_signature(self) -> Optional[str]:
        """The detector signature the object units read (None for sources without one)."""
        if OBJECT not in self.cfg["unit_dims"]:
            return None
        signature = getattr(self.object_units, "signature", None)
        return signature if isinstance(signature, str) and signature else None

    def _pin_object_signature(self) -> None:
        """Features of another detector mean nothing to this model: read only those it
        was trained on, whatever else the store holds."""
        signature = self.cfg.get("object_signature")
        pin = getattr(self.object_units, "pin_signature", None)
        if signature and pin is not None:
            pin(signature)

    def visual_units(self, docs: Sequence[Doc], store: bool = True) -> List[DocUnits]:
        """Collect each doc's units (objects, then caption) and record them on the doc."""
        sources = self.cfg["unit_dims"]
        objects: List[list] = [[] for _ in docs]
        if OBJECT in sources and self.object_units is not None:
            objects = self.object_units(docs)
        prefetch = getattr(self.caption_units, "prefetch", None)
        if CAPTION in sources and prefetch is not None:
            prefetch(docs)  # encode the batch's captions together, not one by one
        result = []
        for doc, doc_objects in zip(docs, objects):
            units = list(doc_objects)
            if CAPTION in sources and self.caption_units is not None:
                units.extend(self.caption_units(doc))
            doc_units = DocUnits(units)
            if store:
                doc._.visual_units = doc_units.meta()
            result.append(doc_units)
        report = getattr(self.caption_units, "report_skipped", None)
        if report is not None:
            report()  # captions are read doc by doc: the batch ends here
        return result

    # ----- prediction -------------------------------------------------------------------
    def _check_initialized(self) -> None:
        if not self.is_initialized:
            raise ValueError(
                f"The '{self.name}' component is not initialized: call nlp.initialize() "
                "before using it, or load a trained pipeline with spacy.load()."
            )

    def predict(self, docs: Iterable[Doc]) -> List[Dict[str, Any]]:
        self._check_initialized()
        docs = list(docs)
        units = self.visual_units(docs)
        predictions: List[Dict[str, Any]] = [{"tags": []} for _ in docs]
        index = [i for i, doc in enumerate(docs) if len(doc)]
        if not index:
            return predictions
        out = self.model.predict(([docs[i] for i in index], [units[i] for i in index], None))
        tags = self.tags
        batch_units = [units[i] for i in index]
        for row, i in enumerate(index):
            predictions[i]["tags"] = [tags[t] for t in out.tags[row]]
            if self.record_attention and out.attention is not None:
                columns = self._unit_columns(batch_units, row)
                n = len(docs[i])
                predictions[i]["attention"] = out.attention[row, :n][:, columns].cpu().numpy()
                if out.gate is not None:
                    predictions[i]["gate"] = out.gate[row, :n].mean(dim=-1).cpu().numpy()
        return predictions

    def _unit_columns(self, batch_units: List[DocUnits], row: int) -> List[int]:
        """Columns of the batch's attention map that hold this doc's real units.

        The model lays units out source by source, each padded to the batch maximum
        (at least one column), in the order of ``cfg["unit_dims"]``.
        """
        columns, offset = [], 0
        for source in self.cfg["unit_dims"]:
            counts = [sum(u.source == source for u in du.units) for du in batch_units]
            columns.extend(offset + j for j in range(counts[row]))
            offset += max([1] + counts)
        return columns

    def set_annotations(self, docs: Iterable[Doc], predictions: List[Dict[str, Any]]) -> None:
        for doc, pred in zip(docs, predictions):
            doc.ents = biluo_tags_to_spans(doc, iob_to_biluo(pred["tags"])) if pred["tags"] else []
            if "attention" in pred:
                doc._.agban_attention = {
                    "units": doc._.visual_units,
                    "attention": pred["attention"].tolist(),
                    "gate": pred["gate"].tolist() if "gate" in pred else None,
                }

    # ----- training ---------------------------------------------------------------------
    def _gold_tags(self, eg: Example) -> List[int]:
        index = {tag: i for i, tag in enumerate(self.tags)}
        result = []
        for biluo in eg.get_aligned_ner():
            if not biluo or biluo in ("O", "-"):
                result.append(0)
                continue
            prefix, label = biluo.split("-", 1)
            bio = ("B-" if prefix in ("B", "U") else "I-") + label
            result.append(index.get(bio, 0))
        return result

    def update(
        self,
        examples: Iterable[Example],
        *,
        drop: float = 0.0,
        sgd: Optional[Optimizer] = None,
        losses: Optional[Dict[str, float]] = None,
    ) -> Dict[str, float]:
        if losses is None:
            losses = {}
        losses.setdefault(self.name, 0.0)
        losses.setdefault(f"{self.name}_adv", 0.0)
        losses.setdefault(f"{self.name}_cv", 0.0)
        self._check_initialized()
        examples = [eg for eg in examples if len(eg.predicted)]
        if not examples:
            return losses
        docs = [eg.predicted for eg in examples]
        inputs: AGBANInput = (docs, self.visual_units(docs), [self._gold_tags(eg) for eg in examples])
        out, backprop = self.model.begin_update(inputs)
        crf_loss = float(out.crf_loss.detach())
        adv_loss = float(out.adversarial_loss.detach())
        cv_loss = float(out.cross_view_loss.detach())
        if numpy.isnan(crf_loss) or numpy.isnan(adv_loss) or numpy.isnan(cv_loss):
            raise ValueError(
                f"NaN loss in '{self.name}' (crf={crf_loss}, adversarial={adv_loss}, "
                f"cross-view={cv_loss})"
            )
        backprop(None)
        if sgd is not None:
            self.finish_update(sgd)
        losses[self.name] += crf_loss
        losses[f"{self.name}_adv"] += adv_loss
        losses[f"{self.name}_cv"] += cv_loss
        return losses

    def finish_update(self, sgd: Optimizer) -> None:
        if self.learn_rate_scale != 1.0:
            sgd = ScaledOptimizer(sgd, self.learn_rate_scale)  # type: ignore[assignment]
        self.model.finish_update(sgd)

    def get_loss(self, examples: Iterable[Example], scores: Any) -> Any:
        raise NotImplementedError(
            "agban computes its CRF and adversarial losses inside the model: use update()."
        )

    # ----- serialization ----------------------------------------------------------------
    def from_bytes(self, bytes_data: bytes, *, exclude=tuple()) -> "AGBANRecognizer":
        msg = srsly.msgpack_loads(bytes_data)
        self.cfg.update(srsly.json_loads(msg["cfg"]))
        self._pin_object_signature()
        self._load_weights(msg["model"])
        return self

    def to_bytes(self, *, exclude=tuple()) -> bytes:
        self._check_initialized()
        return srsly.msgpack_dumps({
            "cfg": srsly.json_dumps(self.cfg),
            "model": self.model.to_bytes(),
        })

    def to_disk(self, path: Union[str, Path], *, exclude=tuple()) -> None:
        self._check_initialized()
        path = util.ensure_path(path)
        serializers = {
            "cfg": lambda p: srsly.write_json(p, self.cfg),
            "model": lambda p: p.open("wb").write(self.model.to_bytes()),
        }
        util.to_disk(path, serializers, exclude)

    def from_disk(self, path: Union[str, Path], *, exclude=tuple()) -> "AGBANRecognizer":
        path = util.ensure_path(path)
        self.cfg.update(srsly.read_json(path / "cfg"))
        self._pin_object_signature()
        self._load_weights((path / "model").read_bytes())
        return self

    def _load_weights(self, model_bytes: bytes) -> None:
        self._build_model()
        self.model.initialize()
        self.model.from_bytes(model_bytes)
