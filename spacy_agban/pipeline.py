"""The ``agban`` pipeline component: visual units + AGBAN model -> ``doc.ents``."""
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy
import srsly
from spacy import util
from spacy.language import Language
from spacy.pipeline import TrainablePipe
from spacy.scorer import get_ner_prf
from spacy.tokens import Doc, Span, SpanGroup
from spacy.training import Example, validate_get_examples
from spacy.vocab import Vocab
from thinc.api import Config, Model, Optimizer, set_dropout_rate

from .architectures import AGBANInput, get_module, set_sizes
from .extensions import SCORED_BY
from .model.tags import entity_spans, tag_names
from .training.corpus import patch_stock_corpus_in_spacy_evaluate
from .training.optimizer import ScaledOptimizer
from .training.teacher import example_targets
from .units.base import CAPTION, OBJECT, DocUnits, ObjectUnitSource, UnitSource, VisualUnit
from .units.saved_paths import IMAGE_ROOT, STORE, record_paths, restored_paths
from .units.captioner import needs_caption, warn_uncaptioned

# The same model as configs/concat.cfg (a test checks): Concat fusion, the Table III row best
# on dev with caption units; fusion = "gban" with adversarial = true is the paper's AGBAN.
DEFAULT_CONFIG_STR = """
[model]
@architectures = "spacy_agban.AGBAN.v3"
fusion = "concat"
adversarial = false
grl_lambda = 1.0
use_word_features = true
visual_dropout = 0.3
source_dropout = 0.0
cross_view = 1.0
distill = 0.0
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
#: doc.spans key of the entities with their confidences (spaCy's spancat uses "sc")
DEFAULT_SPANS_KEY = "agban"
STORE_CONFIDENCE_DEFAULT = True


@Language.factory(
    "agban",
    assigns=["doc.ents", "token.ent_iob", "token.ent_type", "doc.spans", "doc._.visual_units",
             "doc._.agban_attention"],
    default_config={
        "model": DEFAULT_MODEL,
        "caption_units": DEFAULT_CAPTION_UNITS,
        "object_units": None,
        "max_words": 50000,
        "record_attention": False,
        "learn_rate_scale": 1.0,
        "bio_constraints": False,
        "min_confidence": 0.0,
        "store_confidence": STORE_CONFIDENCE_DEFAULT,
        "spans_key": DEFAULT_SPANS_KEY,
        "scorer": {"@scorers": "spacy.ner_scorer.v1"},
    },
    default_score_weights={"ents_f": 1.0, "ents_p": 0.0, "ents_r": 0.0, "ents_per_type": None},
)
def make_agban(
    nlp: Language,
    name: str,
    model: Model,
    caption_units: Optional[UnitSource],
    object_units: Optional[ObjectUnitSource],
    max_words: int,
    record_attention: bool,
    learn_rate_scale: float,
    bio_constraints: bool,
    min_confidence: float,
    store_confidence: bool,
    spans_key: str,
    scorer: Optional[Callable],
) -> "AGBANRecognizer":
    """Multimodal NER (AGBAN): reads ``doc._.image`` / ``doc._.image_caption``.

    learn_rate_scale: this component's learning rate relative to the optimizer's
    (spaCy has one optimizer for the pipeline): e.g. 33.3 to train the AGBAN head at
    1e-3 on top of a transformer fine-tuned at 3e-5.
    bio_constraints: decode valid BIO sequences only (an I- tag only after the B- or
    I- of its label). Prediction only: switch it on or off for a trained pipeline with
    ``spacy.load(path, config={"components": {"agban": {"bio_constraints": True}}})``.
    Off by default, so that pipelines saved before it existed tag as they did.
    min_confidence: tag O every entity one of whose tokens has a CRF marginal
    probability of its decoded tag below this (0 keeps every entity of the Viterbi
    sequence). Prediction only, like bio_constraints; 0 by default for the same reason.
    store_confidence: also put the entities in ``doc.spans[spans_key]`` with their
    confidence in ``attrs["scores"]`` (as spaCy's spancat does; ``span._.agban_confidence``
    reads it): the quantity min_confidence thresholds, so an entity kept at a threshold
    has a confidence at least that high. Prediction only. On by default: its one
    forward-backward pass of the CRF, in numpy on CPU, measured about 5% of this pipe's
    time (docs/guide.md, "Confidence per entity").
    """
    # only inside `spacy evaluate`, which reads its data with spaCy's own Corpus after
    # loading the pipeline: nothing global changes otherwise (see corpus.py)
    patch_stock_corpus_in_spacy_evaluate()
    return AGBANRecognizer(
        nlp.vocab, model, name,
        caption_units=caption_units, object_units=object_units, max_words=max_words,
        record_attention=record_attention, learn_rate_scale=learn_rate_scale,
        bio_constraints=bio_constraints, min_confidence=min_confidence,
        store_confidence=store_confidence, spans_key=spans_key, scorer=scorer,
    )


def bio_tags(labels: Sequence[str]) -> List[str]:
    return tag_names(labels)


def bio_spans(doc: Doc, tags: Sequence[str]) -> List[Span]:
    """The entities of O / B- / I- tag strings, read by :func:`~.model.tags.entity_spans`
    (as spaCy's ``biluo_tags_to_spans(doc, iob_to_biluo(tags))`` reads them)."""
    labels = sorted({tag[2:] for tag in tags if tag != OUTSIDE})
    index = {label: i for i, label in enumerate(labels)}
    ids = [0 if tag == OUTSIDE else 1 + 2 * index[tag[2:]] + (tag[0] == "I") for tag in tags]
    return [Span(doc, start, end, label=labels[label]) for start, end, label in entity_spans(ids)]


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
        caption_units: Optional[UnitSource] = None,
        object_units: Optional[ObjectUnitSource] = None,
        max_words: int = 50000,
        record_attention: bool = False,
        learn_rate_scale: float = 1.0,
        bio_constraints: bool = False,
        min_confidence: float = 0.0,
        store_confidence: bool = STORE_CONFIDENCE_DEFAULT,
        spans_key: str = DEFAULT_SPANS_KEY,
        scorer: Optional[Callable] = get_ner_prf,
    ):
        if not learn_rate_scale > 0:
            raise ValueError(f"learn_rate_scale must be > 0, got {learn_rate_scale}")
        if not isinstance(spans_key, str) or not spans_key:
            raise ValueError(f"spans_key must be a non-empty string (a doc.spans key), got {spans_key!r}")
        if not 0.0 <= min_confidence < 1.0:
            raise ValueError(
                f"min_confidence must be in [0, 1) (a probability; 0 keeps every entity), got {min_confidence}"
            )
        for arg, source, kind in (
            ("caption_units", caption_units, UnitSource),
            ("object_units", object_units, ObjectUnitSource),
        ):
            if source is not None and not isinstance(source, kind):
                raise TypeError(
                    f"{arg} must be a spacy_agban.units.base.{kind.__name__} (or None), "
                    f"got {type(source).__name__}"
                )
        self.vocab = vocab
        self.model = model
        self.name = name
        self.caption_units = caption_units
        self.object_units = object_units
        self.record_attention = record_attention
        self.learn_rate_scale = learn_rate_scale
        self.bio_constraints = bio_constraints
        self.min_confidence = min_confidence
        self.store_confidence = store_confidence
        self.spans_key = spans_key
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
    def label_data(self) -> List[str]:
        """The entity types, as ``spacy init labels`` saves them for
        ``[initialize.components.agban.labels]``."""
        return list(self.labels)

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

    def _configured_sources(self) -> Dict[str, UnitSource]:
        """The configured sources, objects first: the order of a doc's units."""
        sources: Dict[str, UnitSource] = {}
        if self.object_units is not None:
            sources[OBJECT] = self.object_units
        if self.caption_units is not None:
            sources[CAPTION] = self.caption_units
        return sources

    def _unit_dims(self, static_width: int) -> Dict[str, int]:
        dims = {}
        for name, source in self._configured_sources().items():
            # word-vector units take the vectors' width (none without vectors)
            width = source.width or static_width
            if width:
                dims[name] = int(width)
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
        """Size the model from the examples, then build it.

        labels: the entity types to tag, e.g. those ``spacy init labels`` saved
            (``[initialize.components.agban.labels]``); by default the types of the
            examples' reference entities. The tags are O and B-/I- of each.
        """
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
        if OBJECT not in self.cfg["unit_dims"] or self.object_units is None:
            return None
        return self.object_units.signature or None

    def _pin_object_signature(self) -> None:
        """Features of another detector mean nothing to this model: read only those it
        was trained on, whatever else the store holds."""
        signature = self.cfg.get("object_signature")
        if signature and self.object_units is not None:
            self.object_units.pin_signature(signature)

    def visual_units(self, docs: Sequence[Doc], store: bool = True) -> List[DocUnits]:
        """Collect each doc's units (objects, then caption) and record them on the doc.

        Only the sources the model was built for are asked (a caption source without
        word vectors to read has no units to give).
        """
        units: List[List[VisualUnit]] = [[] for _ in docs]
        for name, source in self._configured_sources().items():
            if name not in self.cfg["unit_dims"]:
                continue
            found = source(docs)
            if len(found) != len(docs):
                raise ValueError(
                    f"the {name} unit source {type(source).__name__} returned units for "
                    f"{len(found)} docs, but was given {len(docs)}"
                )
            for doc_units, more in zip(units, found):
                doc_units.extend(more)
        result = [DocUnits(doc_units) for doc_units in units]
        if store:
            for doc, doc_units in zip(docs, result):
                doc._.visual_units = doc_units.meta()
        return result

    # ----- prediction -------------------------------------------------------------------
    def _check_initialized(self) -> None:
        if not self.is_initialized:
            raise ValueError(
                f"The '{self.name}' component is not initialized: call nlp.initialize() "
                "before using it, or load a trained pipeline with spacy.load()."
            )

    # Docs with an image and no caption, given to a model that reads captions, would be
    # tagged from their text alone without a word: count them, warn once per call.
    def _reads_captions(self) -> bool:
        return CAPTION in self.cfg.get("unit_dims", {})

    def __call__(self, doc: Doc) -> Doc:
        if self._reads_captions():
            warn_uncaptioned(int(needs_caption(doc)), self.name)
        return super().__call__(doc)

    def pipe(self, stream: Iterable[Doc], *, batch_size: int = 128) -> Iterator[Doc]:
        if not self._reads_captions():
            yield from super().pipe(stream, batch_size=batch_size)
            return
        uncaptioned = 0

        def counted() -> Iterator[Doc]:
            nonlocal uncaptioned
            for doc in stream:
                uncaptioned += needs_caption(doc)
                yield doc

        yield from super().pipe(counted(), batch_size=batch_size)
        warn_uncaptioned(uncaptioned, self.name)

    def predict(self, docs: Iterable[Doc]) -> List[Dict[str, Any]]:
        self._check_initialized()
        docs = list(docs)
        units = self.visual_units(docs)
        predictions: List[Dict[str, Any]] = [{"tags": []} for _ in docs]
        index = [i for i, doc in enumerate(docs) if len(doc)]
        if not index:
            return predictions
        # set on every call: the torch module is rebuilt by initialize and by loading
        output = get_module(self.model).output
        output.bio_constraints = bool(self.bio_constraints)
        output.min_confidence = float(self.min_confidence)
        output.store_confidence = bool(self.store_confidence)
        out = self.model.predict(([docs[i] for i in index], [units[i] for i in index], None))
        tags = self.tags
        for row, i in enumerate(index):
            predictions[i]["tags"] = [tags[t] for t in out.tags[row]]
            if out.confidences is not None:
                predictions[i]["confidences"] = out.confidences[row]
            if self.record_attention and out.attention is not None:
                assert out.unit_mask is not None
                n = len(docs[i])
                # the doc's own units, in the order of doc._.visual_units; the rest is padding
                own = out.unit_mask[row]
                predictions[i]["attention"] = out.attention[row, :n][:, own].cpu().numpy()
                if out.gate is not None:
                    predictions[i]["gate"] = out.gate[row, :n].mean(dim=-1).cpu().numpy()
        return predictions

    def tag_marginals(self, docs: Iterable[Doc]) -> List[Optional[numpy.ndarray]]:
        """Each doc's CRF tag marginals, (n_tokens, len(self.tags)) float32 in the order
        of :attr:`tags` (None for an empty doc): the model's belief before any decoding
        rule (``min_confidence``, ``bio_constraints``). Sets nothing on the docs."""
        self._check_initialized()
        docs = list(docs)
        units = self.visual_units(docs)
        result: List[Optional[numpy.ndarray]] = [None] * len(docs)
        index = [i for i, doc in enumerate(docs) if len(doc)]
        if not index:
            return result
        output = get_module(self.model).output
        output.store_marginals = True
        try:
            out = self.model.predict(([docs[i] for i in index], [units[i] for i in index], None))
        finally:
            output.store_marginals = False
        assert out.marginals is not None
        marginals = out.marginals.cpu().numpy()
        for row, i in enumerate(index):
            result[i] = marginals[row, : len(docs[i])].copy()
        return result

    def set_annotations(self, docs: Iterable[Doc], predictions: List[Dict[str, Any]]) -> None:
        for doc, pred in zip(docs, predictions):
            entities = bio_spans(doc, pred["tags"])
            doc.ents = entities
            if self.store_confidence:  # an empty doc has no tags, no entities, no scores
                scores = pred.get("confidences", [])
                assert len(scores) == len(entities), "one confidence per entity, in order"
                doc.spans[self.spans_key] = SpanGroup(
                    doc, name=self.spans_key, spans=entities,
                    attrs={"scores": numpy.asarray(scores, dtype="float32"), SCORED_BY: self.name},
                )
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
        set_dropout_rate(self.model, drop)
        docs = [eg.predicted for eg in examples]
        inputs: AGBANInput = (docs, self.visual_units(docs), [self._gold_tags(eg) for eg in examples])
        distill = get_module(self.model).distill > 0
        if distill:  # a teacher's marginals where the training data has them
            inputs = inputs + ([example_targets(eg, self.tags) for eg in examples],)
        out, backprop = self.model.begin_update(inputs)
        crf_loss = float(out.crf_loss.detach())
        adv_loss = float(out.adversarial_loss.detach())
        cv_loss = float(out.cross_view_loss.detach())
        distill_loss = float(out.distill_loss.detach()) if out.distill_loss is not None else 0.0
        if any(numpy.isnan(x) for x in (crf_loss, adv_loss, cv_loss, distill_loss)):
            raise ValueError(
                f"NaN loss in '{self.name}' (crf={crf_loss}, adversarial={adv_loss}, "
                f"cross-view={cv_loss}, distill={distill_loss})"
            )
        backprop(None)
        if sgd is not None:
            self.finish_update(sgd)
        losses[self.name] += crf_loss
        losses[f"{self.name}_adv"] += adv_loss
        losses[f"{self.name}_cv"] += cv_loss
        if distill:
            losses[f"{self.name}_distill"] = losses.get(f"{self.name}_distill", 0.0) + distill_loss
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
    # Two fields, "cfg" and "model", as spaCy's trainable pipes (less the vocab, which
    # the pipeline saves once for all its components); ``exclude`` names fields to skip.
    # cfg comes first: it sizes the model that the weights are loaded into.
    def to_bytes(self, *, exclude: Iterable[str] = tuple()) -> bytes:
        if "model" not in exclude:
            self._check_initialized()
        self._record_paths(None)
        serialize = {
            "cfg": lambda: srsly.json_dumps(self.cfg),
            "model": self.model.to_bytes,
        }
        return util.to_bytes(serialize, exclude)

    def from_bytes(self, bytes_data: bytes, *, exclude: Iterable[str] = tuple()) -> "AGBANRecognizer":
        deserialize = {
            "cfg": lambda b: self._load_cfg(srsly.json_loads(b), None),
            "model": self._load_weights,
        }
        util.from_bytes(bytes_data, deserialize, exclude)
        return self

    def to_disk(self, path: Union[str, Path], *, exclude: Iterable[str] = tuple()) -> None:
        if "model" not in exclude:
            self._check_initialized()
        self._record_paths(Path(path).parent)
        serialize = {
            "cfg": lambda p: srsly.write_json(p, self.cfg),
            "model": lambda p: self.model.to_disk(p),
        }
        util.to_disk(path, serialize, exclude)

    def from_disk(self, path: Union[str, Path], *, exclude: Iterable[str] = tuple()) -> "AGBANRecognizer":
        deserialize = {
            # the pipeline folder: a store saved inside it is found wherever it is
            "cfg": lambda p: self._load_cfg(srsly.read_json(p), Path(p).parent.parent),
            "model": lambda p: self._load_weights(p.read_bytes()),
        }
        util.from_disk(path, deserialize, exclude)
        return self

    def _load_cfg(self, cfg: Dict[str, Any], pipeline_dir: Optional[Path]) -> None:
        self.cfg.update(cfg)
        self._pin_object_signature()
        self._restore_paths(pipeline_dir)

    # A relative image_root or store in the config resolves against the current folder,
    # which differs wherever the saved pipeline is loaded from: what they named when the
    # pipeline was saved is kept in cfg and used again (units/saved_paths.py).
    def _record_paths(self, pipeline_dir: Optional[Path]) -> None:
        for key in (IMAGE_ROOT, STORE):
            self.cfg.pop(key, None)
        self.cfg.update(record_paths(self.object_units, pipeline_dir))

    def _restore_paths(self, pipeline_dir: Optional[Path]) -> None:
        units = self.object_units
        if not hasattr(units, "use_store"):  # none, or a source of another kind
            return
        found = restored_paths(units.image_root_arg, units.store_arg, self.cfg, pipeline_dir,  # type: ignore[union-attr]
                               creates_store=units.creates_store)  # type: ignore[union-attr]
        if found.image_root is not None:
            units.use_image_root(found.image_root)  # type: ignore[union-attr]
        if found.store is not None or found.saved_store is not None:
            units.use_store(found.store or units.store_path, saved=found.saved_store)  # type: ignore[union-attr]
        if OBJECT in self.cfg["unit_dims"]:  # fail at load, not at the first post
            units.check_store()  # type: ignore[union-attr]

    def _load_weights(self, model_bytes: bytes) -> None:
        self._build_model()
        self.model.initialize()
        self.model.from_bytes(model_bytes)
