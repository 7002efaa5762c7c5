"""What a saved pipeline reads, decided once per job, and loading it in a worker.

- :func:`describe_pipeline`: reads the pipeline's config and its agban
  component's ``cfg`` once, on the driver, into a :class:`PipelineReads` (object
  units or captions, its store, its image root, its detector signature, its
  precision) that both engines hand down to every worker.
- :func:`load_tagger`: the pipeline itself. With ``objects_from_columns`` (the
  Ray tag actors) its object units are not built at all (no detector, no
  store): the detected objects arrive as columns.
- :func:`load_object_units`: only the pipeline's ``object_units`` block (store,
  detector, image rules), without loading the pipeline, plus the features
  dataset: what an objects worker needs.
- :func:`attach_features` / :func:`attach_captions`: the features dataset's
  detections before the object units' store, its captions before the
  captioner's store.
"""
from dataclasses import dataclass, field
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


def object_units_block(model: str, config: Any = None,
                       cfg: Optional[Dict[str, Any]] = None) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    """(component name, its ``object_units`` block as a dict, or None). ``config`` and
    ``cfg`` (the agban component's): already read, or read here."""
    config = read_config(model) if config is None else config
    name = agban_component(config)
    if name is None:
        return None, None
    block = config["components"][name].get("object_units")
    if not block:
        return name, None
    block = dict(block)
    # As the loaded pipe does (units/saved_paths.py): a relative image_root or store is
    # what it named when the pipeline was saved; a store in the pipeline folder, that copy.
    from ..units.saved_paths import restored_paths

    saved = _saved_cfg(Path(model) / name / "cfg") if cfg is None else cfg
    found = restored_paths(block.get("image_root"), block.get("store"), saved,
                           Path(model), creates_store=bool(block.get("detector")))
    if found.image_root is not None:
        block["image_root"] = found.image_root
    if found.store is not None:
        block["store"] = found.store
    return name, block


def _saved_cfg(cfg_path: Path) -> Dict[str, Any]:
    import srsly

    try:
        saved = srsly.read_json(cfg_path)
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


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


@dataclass(frozen=True)
class PipelineReads:
    """What a saved pipeline reads when it tags: decided once per job on the driver
    (:func:`describe_pipeline`) and handed to every worker of either engine (small
    and picklable), so that no step reads the saved config again to find out.

    An image-captioning stage adds what it reads here (its captioner), beside the
    object units, so that both engines get it from this one description too.
    """

    model: str  #: the pipeline folder, absolute
    components: Tuple[str, ...] = ()  #: its pipeline, in order (what ``spacy.load`` reads)
    agban: Optional[str] = None  #: the agban component
    units: Tuple[str, ...] = ()  #: the visual units it was trained with (object, caption)
    object_units: Optional[Dict[str, Any]] = None  #: its object_units block (saved paths restored)
    changes: Dict[str, Any] = field(default_factory=dict)  #: the job's changes to it (:func:`unit_overrides`)
    signature: Optional[str] = None  #: the detector signature of the object features it was trained on
    precision: str = "fp32"  #: its transformer's (``spacy_agban.inference.precision``)
    captioner: Optional[str] = None  #: its image_captioner component (captions images without one)
    captioner_block: Optional[Dict[str, Any]] = None  #: that component's config, with the job's changes
    captioner_changes: Dict[str, Any] = field(default_factory=dict)  #: the job's changes to it

    @property
    def reads_images(self) -> bool:
        """Whether the job reads images: for their objects, or to caption them."""
        return self.reads_objects or self.captioner is not None

    @property
    def reads_objects(self) -> bool:
        """Whether the job reads images: the pipeline was trained with object units and has them."""
        from ..units.base import OBJECT

        return self.object_units is not None and OBJECT in self.units

    @property
    def has_detector(self) -> bool:
        return bool(self.object_units and self.object_units.get("detector"))

    def object_units_block(self, device: Optional[str] = None) -> Optional[Dict[str, Any]]:
        """A copy of the object_units block with the job's changes applied (and the
        detector put on ``device``); None if the pipeline has none."""
        if self.object_units is None:
            return None
        block = _deep_copy(self.object_units)
        changes = {**self.changes, **({"detector.device": device} if device else {})}
        for key, value in changes.items():
            target = block
            *path, last = key.split(".")
            for part in path:
                target = target.get(part) if isinstance(target, dict) else None
            if isinstance(target, dict):  # a change to an absent block (detector = null) has nothing to change
                target[last] = value
        return block

    def loader_kwargs(self) -> Dict[str, Any]:
        """The image rules (:class:`~spacy_agban.detection.images.ImageLoader`) of the job."""
        block = self.object_units_block() or dict(self.captioner_block or {})
        root = block.get("image_root")
        return {"image_root": str(Path(root).resolve()) if root and "://" not in str(root) else root,
                "allow_remote": bool(block.get("allow_remote", False)),
                "max_pixels": int(block.get("max_pixels", 64_000_000))}

    @property
    def store(self) -> Optional[str]:
        store = (self.object_units or {}).get("store")
        return str(store) if store else None

    def written_files(self) -> Tuple[str, ...]:
        """Files a job may write beside the pipeline (left out of its fingerprint): its
        SQLite stores (objects, captions) and their journals."""
        stores = [str(s) for s in (self.store, (self.captioner_block or {}).get("store")) if s]
        return tuple(store + suffix for store in stores for suffix in ("", "-wal", "-shm", "-journal"))


def describe_pipeline(model: str, image_root: Optional[str] = None, allow_remote: Optional[bool] = None,
                      device: Optional[str] = None, precision: str = "fp32") -> PipelineReads:
    """Read the saved pipeline's config and agban ``cfg`` once: what it reads, with
    the job's changes (``image_root``, ``allow_remote``, the detector's ``device``)."""
    folder = str(Path(model).resolve())
    config = read_config(folder)
    name = agban_component(config)
    cfg = _saved_cfg(Path(folder) / name / "cfg") if name is not None else {}
    _, block = object_units_block(folder, config, cfg)
    dims = cfg.get("unit_dims")
    captioner, caption_block, caption_changes = _captioner_block(config, image_root, allow_remote, device)
    return PipelineReads(
        model=folder, components=tuple(config["nlp"]["pipeline"]), agban=name,
        units=tuple(dims) if isinstance(dims, dict) else (), object_units=block,
        changes=unit_overrides(block, image_root, allow_remote, device),
        signature=cfg.get("object_signature") or None, precision=precision,
        captioner=captioner, captioner_block=caption_block, captioner_changes=caption_changes,
    )


def _captioner_block(config: Any, image_root: Optional[str], allow_remote: Optional[bool],
                     device: Optional[str]) -> Tuple[Optional[str], Optional[Dict[str, Any]], Dict[str, Any]]:
    """(name, config with the job's changes, the changes) of the pipeline's image_captioner."""
    for name in config["nlp"]["pipeline"]:
        block = config["components"].get(name, {})
        if block.get("factory") == "image_captioner":
            changes: Dict[str, Any] = {}
            if image_root is not None:
                changes["image_root"] = str(image_root)
            if allow_remote is not None:
                changes["allow_remote"] = bool(allow_remote)
            if device is not None:
                changes["device"] = device
            return name, {**_deep_copy(dict(block)), **changes}, changes
    return None, None, {}


def load_captioner(reads: PipelineReads, device: Optional[str] = None) -> Any:
    """The pipeline's image_captioner alone (the other components are not loaded)."""
    import spacy

    import spacy_agban  # noqa: F401  (registrations)

    changes = {**reads.captioner_changes, **({"device": device} if device else {})}
    others = [name for name in reads.components if name != reads.captioner]
    nlp = spacy.load(reads.model, exclude=others,
                     config={f"components.{reads.captioner}.{key}": value for key, value in changes.items()})
    return nlp.get_pipe(str(reads.captioner))


def load_tagger(reads: PipelineReads, objects_from_columns: bool = False, gpu_id: int = -1,
                captions_from_columns: bool = False) -> Any:
    """``spacy.load`` with the job's changes to the object_units block, its transformer
    in the job's precision. captions_from_columns: leave the image_captioner out (the
    Ray tag actors get the captions as columns)."""
    import spacy

    import spacy_agban  # noqa: F401  (registrations)
    from ..inference.precision import set_precision
    from .core import ColumnObjects, agban_pipes, uses_objects

    if gpu_id >= 0:
        spacy.prefer_gpu(gpu_id)  # a no-op without cupy; the detector has its own device
    overrides: Dict[str, Any] = {}
    if reads.agban is not None and reads.object_units is not None:
        if objects_from_columns:
            overrides[f"components.{reads.agban}.object_units"] = None
        else:
            for key, value in reads.changes.items():
                overrides[f"components.{reads.agban}.object_units.{key}"] = value
    exclude = [reads.captioner] if captions_from_columns and reads.captioner else []
    if reads.captioner and not exclude:
        for key, value in reads.captioner_changes.items():
            overrides[f"components.{reads.captioner}.{key}"] = value
    nlp = spacy.load(reads.model, config=overrides, exclude=exclude)
    set_precision(nlp, reads.precision)
    if objects_from_columns and uses_objects(nlp):
        for pipe in agban_pipes(nlp):
            pipe.object_units = ColumnObjects()
    return nlp


def load_object_units(reads: PipelineReads, features: Optional[str] = None, shared: bool = False,
                      device: Optional[str] = None) -> Any:
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

    block = reads.object_units_block(device)
    if block is None:
        return None
    if shared and block.get("store") and not Path(block["store"]).is_file() and (block.get("detector") or features):
        block["store"] = None
    if not block.get("store") and not block.get("detector") and features:
        units = _object_units_without_store(block, features)
    else:
        units = registry.resolve({"units": block})["units"]
        attach_features(units, features)
    if shared:
        units.write_store = False
    if reads.signature:
        units.pin_signature(reads.signature)
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


def attach_captions(captioner: Any, features: Optional[str]) -> None:
    """Read the captions of the features dataset ``features`` before the captioner's
    store; the captions it generates are added to the dataset."""
    if captioner is None or not features:
        return
    from .features import CaptionDataset

    captioner.features = CaptionDataset(features, writable=True)


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value
