"""Shared fixtures: a tiny agban pipeline that trains in seconds."""
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy
import pytest
import spacy
from spacy.language import Language
from spacy.training import Example

import spacy_agban  # noqa: F401  (registers the component and extensions)
from spacy_agban.units.base import OBJECT, OBJECT_FEATURE_DIM, ObjectUnitSource, VisualUnit


def pytest_collection_modifyitems(session, config, items) -> None:
    """Run the Ray tests last.

    A Ray driver leaves threads (gRPC among them) in the test process even after
    ``ray.shutdown()``; a process forked after that, as ``nlp.pipe(n_process=2)``
    does, can deadlock on a lock one of those threads held. Ordering keeps every
    forking test before the first Ray test. The multi-node test comes after the
    module that shares one cluster among its tests (it starts a cluster of its own).
    """
    items.sort(key=lambda item: (item.nodeid.startswith("tests/tagging/test_ray"),
                                 item.nodeid.startswith("tests/tagging/test_ray_cluster.py")))

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets" / "twitter2015"

TINY_MODEL = {
    "hidden": 16, "gban_dim": 8, "gate_dim": 8, "discriminator_hidden": 8,
    "char_dim": 8, "char_hidden": 8, "word_dim": 8, "dropout": 0.0,
}
VECTOR_WORDS = [
    "kolo", "is", "here", "dog", "grass", "man", "smiling", "camera", "paris", "tower",
    "night", "apple", "store", "phones", "love", "visiting", "today", "playing", "eiffel",
]

# The same text with different captions has different entity types: only a model that
# uses the caption units can fit all of them.
Post = Tuple[str, Optional[str], List[Tuple[int, int, str]]]
CAPTION_POSTS: List[Post] = [
    ("Kolo is here", "a dog playing on the grass", [(0, 4, "MISC")]),
    ("Kolo is here", "a man smiling at the camera", [(0, 4, "PER")]),
    ("I love Paris", "the eiffel tower at night", [(7, 12, "LOC")]),
    ("Visiting Apple today", "a store with phones", [(9, 14, "ORG")]),
]
TEXT_POSTS: List[Post] = [
    ("Kolo is here", None, [(0, 4, "PER")]),
    ("I love Paris", None, [(7, 12, "LOC")]),
    ("Visiting Apple today", None, [(9, 14, "ORG")]),
    ("Nothing to see", None, []),
]


def make_nlp(
    fusion: str = "gban",
    adversarial: bool = True,
    caption_top_k: Optional[int] = 3,
    object_units: Optional[dict] = None,
    **model,
) -> Language:
    nlp = spacy.blank("en")
    rng = numpy.random.default_rng(0)
    nlp.vocab.reset_vectors(width=8)
    for word in VECTOR_WORDS:
        nlp.vocab.set_vector(word, rng.normal(size=8).astype("float32"))
    config: Dict[str, object] = {
        "model": {**TINY_MODEL, "fusion": fusion, "adversarial": adversarial, **model}
    }
    config["caption_units"] = (
        None if caption_top_k is None
        else {"@misc": "spacy_agban.CaptionUnits.v1", "top_k": caption_top_k}
    )
    config["object_units"] = object_units
    nlp.add_pipe("agban", config=config)
    return nlp


def make_examples(nlp: Language, posts: List[Post]) -> List[Example]:
    examples = []
    for text, caption, entities in posts:
        eg = Example.from_dict(nlp.make_doc(text), {"entities": entities})
        eg.predicted._.image_caption = caption
        eg.reference._.image_caption = caption
        examples.append(eg)
    return examples


def make_doc(nlp: Language, text: str, caption: Optional[str] = None):
    doc = nlp.make_doc(text)
    doc._.image_caption = caption
    return doc


def train(nlp: Language, examples: List[Example], steps: int = 150, learn_rate: float = 0.02):
    optimizer = nlp.initialize(lambda: examples)
    optimizer.learn_rate = learn_rate
    losses: Dict[str, float] = {}
    for _ in range(steps):
        losses = {}
        nlp.update(examples, sgd=optimizer, losses=losses)
    return losses


def ents(doc) -> List[Tuple[int, int, str]]:
    return [(e.start_char, e.end_char, e.label_) for e in doc.ents]


@pytest.fixture(scope="session")
def caption_pipeline(tmp_path_factory) -> Tuple[Language, Path]:
    """A tiny AGBAN pipeline overfitted on CAPTION_POSTS, and where it was saved."""
    # torch seeds its generator at random in each process: without a seed, whether the
    # overfit reaches every test's bar would change from run to run
    spacy.util.fix_random_seed(0)
    nlp = make_nlp()
    train(nlp, make_examples(nlp, CAPTION_POSTS))
    path = tmp_path_factory.mktemp("caption_pipeline") / "model"
    nlp.to_disk(path)
    return nlp, path


class FakeObjects(ObjectUnitSource):
    """An object source with a distinct, fixed 1024-d feature per image name."""

    def __call__(self, docs):
        result = []
        for doc in docs:
            image = doc._.image
            if not image:
                result.append([])
                continue
            seed = sum(ord(c) for c in str(image))
            rng = numpy.random.default_rng(seed)
            result.append([
                VisualUnit(OBJECT, rng.normal(size=OBJECT_FEATURE_DIM).astype("float32"),
                           label=f"object{i}", score=0.9 - 0.1 * i, box=(0, 0, 10, 10))
                for i in range(2)
            ])
        return result


@spacy.util.registry.misc("tests.FakeObjects.v1")
def make_fake_objects():
    return FakeObjects()
