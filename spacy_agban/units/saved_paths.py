"""Where a saved pipeline's object units find their files, from any folder.

A relative path in a config (``image_root``, the feature ``store``) resolves against the
current folder, which differs wherever a pipeline is loaded from (another project, an
installed ``spacy package``). When the agban pipe is saved it records in its ``cfg`` the
file or folder each relative path named then, and a store that lies inside the pipeline
folder relative to that folder; a loaded pipe uses them again (docs/robustness.md). The
batch engines read the ``object_units`` block without loading the pipe and apply the same
rules through :func:`restored_paths`.

Rules, for a path whose configured value is the one it was saved with (an override, such
as ``tag --image-root``, is the caller's choice and resolves against the current folder):

- a store inside the pipeline folder (saved there, or put there at its configured relative
  path, e.g. before ``spacy package``): the pipeline's own copy, wherever the folder now is;
- a relative path: what it named when saved, if that is still there (for a store that a
  detector fills, if its folder is);
- otherwise the configured path against the current folder, as any relative path.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

IMAGE_ROOT = "image_root"
STORE = "store"


@dataclass
class Restored:
    """What a loaded pipe uses instead of its configured paths (None: the configured one)."""

    image_root: Optional[str] = None
    store: Optional[str] = None
    #: where the pipeline was saved with its store, when that is gone (for the error)
    saved_store: Optional[str] = None


def record_paths(units: Any, pipeline_dir: Optional[Path]) -> Dict[str, Dict[str, str]]:
    """The cfg entries to save for ``units`` (an ObjectUnits, or None); pipeline_dir: the
    folder the pipeline is saved to (None when saved to bytes)."""
    entries: Dict[str, Dict[str, str]] = {}
    root = getattr(units, "image_root_arg", None)
    if root is not None and not _is_absolute(root):
        entries[IMAGE_ROOT] = {"configured": root, "resolved": str(units.loader.image_root)}
    store = getattr(units, "store_arg", None)
    if store is not None:
        entry = {"configured": store, "resolved": str(units.store_path)}
        inside = _relative_inside(units.store_path, pipeline_dir)
        if inside is not None:
            entry["in_pipeline"] = inside
        if inside is not None or not _is_absolute(store):
            entries[STORE] = entry
    return entries


def restored_paths(
    image_root: Optional[str],
    store: Optional[str],
    cfg: Dict[str, Any],
    pipeline_dir: Optional[Path],
    creates_store: bool,
) -> Restored:
    """The paths a pipeline saved with ``cfg`` uses for its configured ``image_root`` and
    ``store``, loaded from ``pipeline_dir`` (None: from bytes)."""
    found = Restored()
    saved_root = _entry(cfg, IMAGE_ROOT)
    if saved_root and image_root is not None and str(image_root) == saved_root["configured"] \
            and Path(saved_root["resolved"]).is_dir():
        found.image_root = saved_root["resolved"]
    if store is None:
        return found
    saved = _entry(cfg, STORE)
    if saved is not None and str(store) != saved["configured"]:
        return found
    own = [saved["in_pipeline"]] if saved is not None and isinstance(saved.get("in_pipeline"), str) else []
    if not _is_absolute(str(store)):
        own.append(str(store))  # a store shipped in the pipeline folder at its configured path
    for relative in own:
        copy = _file_inside(pipeline_dir, relative)
        if copy is not None:
            found.store = copy
            return found
    if saved is None or _is_absolute(str(store)):
        return found
    resolved = Path(saved["resolved"])
    if resolved.is_file() or (creates_store and not resolved.exists() and resolved.parent.is_dir()):
        found.store = str(resolved)
    else:
        found.saved_store = str(resolved)
    return found


def _file_inside(folder: Optional[Path], relative: str) -> Optional[str]:
    """``folder / relative`` if it is a file inside ``folder`` (no ``..`` out of it)."""
    if folder is None:
        return None
    folder = Path(folder).resolve()
    path = (folder / relative).resolve()
    return str(path) if path.is_relative_to(folder) and path.is_file() else None


def _entry(cfg: Dict[str, Any], key: str) -> Optional[Dict[str, Any]]:
    saved = cfg.get(key)
    if isinstance(saved, dict) and isinstance(saved.get("configured"), str) and isinstance(saved.get("resolved"), str):
        return saved
    return None


def _is_absolute(path: str) -> bool:
    return Path(path).expanduser().is_absolute()


def _relative_inside(path: Optional[Path], folder: Optional[Path]) -> Optional[str]:
    if path is None or folder is None:
        return None
    folder = Path(folder).resolve()
    return path.relative_to(folder).as_posix() if path.is_relative_to(folder) else None
