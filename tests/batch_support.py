"""Helpers for the batch tests: a small objects pipeline with a saved random detector, posts files."""
import json
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import torch
from PIL import Image

from conftest import CAPTION_POSTS, make_examples, make_nlp, train

IMAGES = Path(__file__).resolve().parents[1] / "assets" / "twitter2015" / "images"
DETECTOR = {"@misc": "spacy_agban.FasterRCNNMobileNetDetector.v1", "top_k": 3, "score_threshold": 0.0,
            "min_size": 128, "max_size": 160, "device": "cpu", "batch_size": 4}  # proposals: the CLI default


def save_random_detector(path: Path) -> Path:
    """A random-weight detector saved to a file, so every process loads the same weights."""
    import warnings

    from safetensors.torch import save_file

    from spacy_agban.detection.detector import make_fasterrcnn_mobilenet_detector

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = {k: v for k, v in DETECTOR.items() if k != "@misc"}
        det = make_fasterrcnn_mobilenet_detector(weights=None, **args)
    save_file({k: v.contiguous() for k, v in det.model.state_dict().items()}, str(path))
    return path


def build_objects_pipeline(root: Path, steps: int = 30) -> Path:
    """A tiny agban pipeline with caption and object units (store + detector), saved."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name in ("102.jpg", "106.jpg", "113.jpg", "130.jpg"):
        shutil.copy(IMAGES / name, images / name)
    weights = save_random_detector(root / "detector.safetensors")
    units = {"@misc": "spacy_agban.ObjectUnits.v1", "store": str(root / "objects.sqlite"),
             "image_root": str(images), "top_k": 3,
             "detector": {**DETECTOR, "weights": str(weights)}}
    nlp = make_nlp(object_units=units)
    examples = make_examples(nlp, CAPTION_POSTS)
    for eg, name in zip(examples, ("102.jpg", "106.jpg", "113.jpg", "130.jpg")):
        eg.predicted._.image = name
        eg.reference._.image = name
    train(nlp, examples, steps=steps)
    path = root / "model"
    nlp.to_disk(path)
    return path


def write_jsonl(path: Path, rows: List[object]) -> Path:
    with path.open("w") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def posts(n: int, images: Optional[List[Optional[str]]] = None) -> List[Dict[str, object]]:
    texts = [t for t, _, _ in CAPTION_POSTS]
    captions = [c for _, c, _ in CAPTION_POSTS]
    images = images or ["102.jpg", "106.jpg", None, "113.jpg", "130.jpg"]
    return [{"id": f"p{i}", "text": texts[i % len(texts)], "caption": captions[i % len(captions)],
             "image": images[i % len(images)]} for i in range(n)]
