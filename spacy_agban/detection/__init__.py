"""Object detection for AGBAN: images → top-k objects → 1024-d object units.

- :mod:`.images`: safe loading of ``doc._.image`` (paths, URLs, PIL images).
- :mod:`.detector`: registered torchvision detectors returning box-head features.
- :mod:`.store`: a SQLite cache of detections, keyed by image content and detector.
- :mod:`.object_units`: ``spacy_agban.ObjectUnits.v1``, what the pipe calls.
- :mod:`.cli`: ``python -m spacy_agban detect``, fills the store ahead of training.
"""
from .detector import RCNNDetector, make_fasterrcnn_mobilenet_detector, make_mask_rcnn_detector
from .images import ImageLoader, ImageLoadError, ImageWarning
from .object_units import ObjectUnits, make_object_units
from .store import Detections, FeatureStore

__all__ = [
    "Detections",
    "FeatureStore",
    "ImageLoadError",
    "ImageLoader",
    "ImageWarning",
    "ObjectUnits",
    "RCNNDetector",
    "make_fasterrcnn_mobilenet_detector",
    "make_mask_rcnn_detector",
    "make_object_units",
]
