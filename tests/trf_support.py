"""Helpers for the transformer tests: tiny agban heads on the offline MiniLM, posts with captions."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union  # noqa: E402

import numpy  # noqa: E402
import spacy  # noqa: E402
from spacy.language import Language  # noqa: E402
from spacy.training import Example  # noqa: E402

import spacy_agban  # noqa: E402,F401
import spacy_agban.layers.transformer  # noqa: E402,F401  (registrations, until the entry points are reinstalled)
from spacy_agban.training.variants import config_and_overrides  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = {"hidden": 16, "gban_dim": 8, "gate_dim": 8, "discriminator_hidden": 8, "dropout": 0.0}
VECTOR_WORDS = ["dog", "grass", "man", "camera", "eiffel", "tower", "night", "store"]
Post = Tuple[str, Optional[str], List[Tuple[int, int, str]]]  # (text, caption, entities)


def build_trf_nlp(
    config_path: Union[str, Path],
    model: Optional[Dict[str, Any]] = None,
    transformer: Optional[Dict[str, Any]] = None,
    overrides: Optional[Dict[str, Any]] = None,
) -> Language:
    """A trf model (a name in configs/ or a .cfg path) with a TINY head (``model`` on top),
    transformer settings and other overrides."""
    path, variant = config_and_overrides(config_path, ROOT / "configs")
    all_overrides: Dict[str, Any] = {"initialize.vectors": None, **variant, **(overrides or {})}
    all_overrides.update({f"components.agban.model.{k}": v for k, v in {**TINY, **(model or {})}.items()})
    all_overrides.update({f"components.transformer.model.{k}": v for k, v in (transformer or {}).items()})
    config = spacy.util.load_config(path, overrides=all_overrides, interpolate=False)
    nlp = spacy.util.load_model_from_config(config, auto_fill=True, validate=True)
    rng = numpy.random.default_rng(0)
    nlp.vocab.reset_vectors(width=8)  # a tiny stand-in for GloVe (caption units)
    for word in VECTOR_WORDS:
        nlp.vocab.set_vector(word, rng.normal(size=8).astype("float32"))
    return nlp


def make_doc(nlp: Language, text: str, caption: Optional[str]):
    doc = nlp.make_doc(text)
    doc._.image_caption = caption
    return doc


def make_examples(nlp: Language, posts: Sequence[Post]) -> List[Example]:
    result = []
    for text, caption, entities in posts:
        eg = Example.from_dict(make_doc(nlp, text, caption), {"entities": entities})
        eg.reference._.image_caption = caption
        result.append(eg)
    return result
