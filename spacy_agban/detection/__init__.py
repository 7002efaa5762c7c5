"""Object detection: images -> top-k objects -> 1024-d box-head features.

- :mod:`.images`: safe loading of ``doc._.image`` (paths, URLs, PIL images).
- :mod:`.detector`: registered torchvision detectors returning box-head features.
- :mod:`.store`: a SQLite cache of detections, keyed by image content and detector.

What the pipe calls is :mod:`spacy_agban.units.objects` (``spacy_agban.ObjectUnits.v1``);
``python -m spacy_agban detect`` (:mod:`spacy_agban.cli.detect`) fills the store ahead
of training.
"""
from .detector import RCNNDetector, make_fasterrcnn_mobilenet_detector, make_mask_rcnn_detector
from .images import ImageLoader, ImageLoadError, ImageWarning
from .store import Detections, FeatureStore

__all__ = [
    "Detections",
    "FeatureStore",
    "ImageLoadError",
    "ImageLoader",
    "ImageWarning",
    "RCNNDetector",
    "make_fasterrcnn_mobilenet_detector",
    "make_mask_rcnn_detector",
]
