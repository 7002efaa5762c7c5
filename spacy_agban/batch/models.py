"""Loading what a batch worker needs from a saved pipeline, once per worker.

- :func:`load_tagger`: the pipeline itself. With ``objects_from_columns`` (the
  Ray tag actors) its object units are not built at all (no detector, no
  store): the detected objects arrive as columns.
- :func:`load_object_units`: only the pipeline's ``object_units`` block (store,
  detector, image rules), resolved without loading the pipeline: what a detect
  worker needs.
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
                gpu_id: int = -1) -> Any:
    """``spacy.load`` with the object_units block changed (keys relative to it)."""
    import spacy

    import spacy_agban  # noqa: F401  (registrations)
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
    if objects_from_columns and uses_objects(nlp):
        for pipe in agban_pipes(nlp):
            pipe.object_units = ColumnObjects()
    return nlp


def load_object_units(model: str, changes: Optional[Dict[str, Any]] = None, keep_store: bool = True) -> Any:
    """The pipeline's ObjectUnits alone (None if it has none). ``keep_store=False``
    drops the SQLite store when there is a detector (a Ray worker on another
    machine has no access to this machine's store)."""
    from spacy.util import registry

    import spacy_agban  # noqa: F401  (registrations)

    _, block = object_units_block(model)
    if block is None:
        return None
    block = _deep_copy(block)
    for key, value in (changes or {}).items():
        target = block
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        target[last] = value
    if not keep_store and block.get("detector"):
        block["store"] = None
    return registry.resolve({"units": block})["units"]


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value
