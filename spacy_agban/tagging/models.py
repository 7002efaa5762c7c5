"""Loading what a batch worker needs from a saved pipeline, once per worker.

- :func:`load_tagger`: the pipeline itself. With ``objects_from_columns`` (the
  Ray tag actors) its object units are not built at all (no detector, no
  store): the detected objects arrive as columns.
- :func:`load_object_units`: only the pipeline's ``object_units`` block (store,
  detector, image rules), resolved without loading the pipeline, plus the
  features dataset: what an objects worker needs.
"""
from pathlib import Path
from typing import Any, Dict, Optional, Tuple


def agban_component(config: Any) -> Optional[str]:
    """The name of the (first) agban component in a pipeline config."""
    for name in config["nlp"]["pipeline"]:
        if config["components"].get(name, {}).get("factory") == "agban":
            return name
    return None


def read_config(model: str) -> Any:
    from spacy.util import load_config

    return load_config(Path(model) / "config.cfg", interpolate=True)


def object_units_block(model: str) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    """(component name, its ``object_units`` block as a dict, or None)."""
    config = read_config(model)
    name = agban_component(config)
    if name is None:
        return None, None
    block = config["components"][name].get("object_units")
    if not block:
        return name, None
    block = dict(block)
    # As the loaded pipe does (AGBANRecognizer._restore_image_root): a relative
    # image_root is the folder it named when the pipeline was saved.
    saved = _saved_image_root(Path(model) / name / "cfg")
    if saved and block.get("image_root") == saved.get("configured") and Path(saved["resolved"]).is_dir():
        block["image_root"] = saved["resolved"]
    return name, block


def _saved_image_root(cfg_path: Path) -> Optional[Dict[str, str]]:
    import srsly

    try:
        saved = srsly.read_json(cfg_path).get("image_root")
    except (OSError, ValueError, AttributeError):
        return None
    return saved if isinstance(saved, dict) and isinstance(saved.get("resolved"), str) else None


def unit_overrides(block: Optional[Dict[str, Any]], image_root: Optional[str] = None,
                   allow_remote: Optional[bool] = None, device: Optional[str] = None) -> Dict[str, Any]:
    """Changes to an object_units block: where images resolve, remote fetches, detector device."""
    changes: Dict[str, Any] = {}
    if block is None:
        return changes
    if image_root is not None:
        changes["image_root"] = str(image_root)
    if allow_remote is not None:
        changes["allow_remote"] = bool(allow_remote)
    if device is not None and isinstance(block.get("detector"), dict):
        changes["detector.device"] = device
    return changes


def load_tagger(model: str, changes: Optional[Dict[str, Any]] = None, objects_from_columns: bool = False,
                gpu_id: int = -1, precision: str = "fp32") -> Any:
    """``spacy.load`` with the object_units block changed (keys relative to it), its
    transformer in ``precision`` (``spacy_agban.inference.precision``)."""
    import spacy

    import spacy_agban  # noqa: F401  (registrations)
    from ..inference.precision import set_precision
    from .core import ColumnObjects, agban_pipes, uses_objects

    if gpu_id >= 0:
        spacy.prefer_gpu(gpu_id)  # a no-op without cupy; the detector has its own device
    name, block = object_units_block(model)
    overrides: Dict[str, Any] = {}
    if name is not None and block is not None:
        if objects_from_columns:
            overrides[f"components.{name}.object_units"] = None
        else:
            for key, value in (changes or {}).items():
                overrides[f"components.{name}.object_units.{key}"] = value
    nlp = spacy.load(model, config=overrides)
    set_precision(nlp, precision)
    if objects_from_columns and uses_objects(nlp):
        for pipe in agban_pipes(nlp):
            pipe.object_units = ColumnObjects()
    return nlp


def load_object_units(model: str, changes: Optional[Dict[str, Any]] = None, features: Optional[str] = None,
                      shared: bool = False) -> Any:
    """The pipeline's ObjectUnits alone (None if it has none), pinned to the detector
    signature the model was trained with, as the loaded pipe would pin it.

    features: a Parquet features dataset read before the store (new detections are
    added to it). shared: many workers, perhaps on other machines, use these units:
    the SQLite store is only read (never written, so that no node writes a store
    file that others cannot see), and left out on a node where it does not exist
    when there is a detector or a features dataset to use instead.
    """
    from spacy.util import registry

    import spacy_agban  # noqa: F401  (registrations)

    name, block = object_units_block(model)
    if block is None:
        return None
    block = _deep_copy(block)
    for key, value in (changes or {}).items():
        target = block
        *path, last = key.split(".")
        for part in path:
            target = target.get(part) if isinstance(target, dict) else None
        if isinstance(target, dict):  # a change to an absent block (detector = null) has nothing to change
            target[last] = value
    if shared and block.get("store") and not Path(block["store"]).is_file() and (block.get("detector") or features):
        block["store"] = None
    if not block.get("store") and not block.get("detector") and features:
        units = _object_units_without_store(block, features)
    else:
        units = registry.resolve({"units": block})["units"]
        attach_features(units, features)
    if shared:
        units.write_store = False
    signature = _trained_signature(model, name)
    if signature:
        units.pin_signature(signature)
    return units


def _object_units_without_store(block: Dict[str, Any], features: str) -> Any:
    from ..units.objects import ObjectUnits
    from .features import FeatureDataset

    keep = {k: v for k, v in block.items() if k in ("image_root", "allow_remote", "max_pixels", "top_k", "signature")}
    return ObjectUnits(features=FeatureDataset(features, writable=False), **keep)


def attach_features(units: Any, features: Optional[str]) -> None:
    """Read the features dataset ``features`` before the store; where there is a
    detector, what it finds is added to the dataset."""
    if units is None or not features:
        return
    from .features import FeatureDataset

    units.features = FeatureDataset(features, writable=units.detector is not None)


def _trained_signature(model: str, name: Optional[str]) -> Optional[str]:
    """The detector signature recorded by the agban pipe at training time."""
    import json

    path = Path(model) / str(name) / "cfg"
    if name is None or not path.is_file():
        return None
    return json.loads(path.read_text()).get("object_signature") or None


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value
