"""Build a pipeline with *stored* object units for the speed benchmark (speed only, not quality).

    python -m benchmarks.object_speed_pipeline /tmp/objects_bench
    python -m benchmarks.speed run --model objects=/tmp/objects_bench/model ...

What is real: the code path of a user with a filled feature store. Every test post gets an
image file (a synthetic JPEG, 400x300, under OUT/images, named as in ``doc._.image``), the
store holds 3 objects (1024-d) for each image's content hash, and the pipeline is
the ``agban_objects`` model of configs/variants.yml (object units only: its ``caption_units = null``, so the
benchmark measures the object path alone), initialized on 200 training posts.
What is not: the features are random and the weights untrained (no detector weights or
Twitter-2015 images here), so its *predictions* mean nothing; the work per post (read and
hash the image file, look up the store, run fusion over its 3 object units) is the real one.
"""
from pathlib import Path

import numpy
import spacy
import typer
from PIL import Image
from spacy.training import Example
from spacy.training.initialize import load_vectors_into_model

import spacy_agban  # noqa: F401  (registrations)
from spacy_agban.units.objects import ObjectUnits
from spacy_agban.detection.store import Detections, FeatureStore
from spacy_agban.training.variants import load_model_config
from spacy_agban.training.docs_io import fresh_doc, read_references

from .paths import ROOT

SIGNATURE = "speed-bench-random-features"


def main(
    out: Path = typer.Argument(..., help="Folder for images/, objects.sqlite and model/"),
    test: Path = typer.Option(ROOT / "corpus" / "test.spacy"),
    train: Path = typer.Option(ROOT / "corpus" / "train.spacy"),
    config: str = typer.Option("agban_objects", help="A model name (configs/, variants.yml) or a .cfg path"),
    seed: int = typer.Option(0),
) -> None:
    rng = numpy.random.default_rng(seed)
    images, store_path = out / "images", out / "objects.sqlite"
    images.mkdir(parents=True, exist_ok=True)
    store_path.unlink(missing_ok=True)
    blank = spacy.blank("en")
    names = sorted({str(d._.image) for path in (test, train)
                    for d in read_references(blank, path) if d._.image})
    for i, name in enumerate(names):  # a distinct picture per name: distinct content hashes
        pixels = numpy.full((300, 400, 3), rng.integers(0, 255, 3), dtype="uint8")
        pixels[i % 300, :, :] = 255 - pixels[i % 300, :, :]
        target = images / name
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(target, format="JPEG", quality=90)
    store = FeatureStore(store_path)
    store.register_signature(SIGNATURE, {"what": "random features for the speed benchmark"})
    keyer = ObjectUnits(store=store, image_root=images, signature=SIGNATURE)
    entries = []
    for name in names:
        key, _ = keyer._content_key(name)
        entries.append((key, Detections(
            rng.normal(size=(3, 1024)).astype("float32"), ["person", "dog", "car"],
            numpy.asarray([0.9, 0.8, 0.7], "float32"),
            numpy.asarray([[0, 0, 100, 100]] * 3, "float32"),
        )))
    store.put_many(entries, SIGNATURE)
    store.close()
    cfg = load_model_config(config, ROOT / "configs", interpolate=False, overrides={
        "paths.object_store": str(store_path), "paths.images": str(images),
        "paths.vectors": str(ROOT / "vectors" / "glove-6b-50d"),
    })
    nlp = spacy.util.load_model_from_config(cfg, auto_fill=True, validate=True)
    load_vectors_into_model(nlp, str(ROOT / "vectors" / "glove-6b-50d"))
    examples = [Example(fresh_doc(nlp, gold), gold) for gold in list(read_references(nlp, train))[:200]]
    nlp.initialize(lambda: examples)
    nlp.to_disk(out / "model")
    typer.echo(f"{len(names)} images and stored objects under {out}; pipeline in {out / 'model'}")


if __name__ == "__main__":
    typer.run(main)
