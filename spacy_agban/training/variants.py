"""Model names: a config file in configs/, or a variant of one in configs/variants.yml.

spaCy's config system has no includes, so a model that differs from a shipped
config in a few settings is written as that config (its ``base``) plus the
overrides ``spacy train`` would take on its command line. Every name means one
model: a name that is both a variant and a ``<name>.cfg`` file is an error. The
quality bench (``--rows``), ``python -m spacy_agban train`` and ``project.yml``
(``--vars.config``) resolve names here, so they train the same model for a name.
"""
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import srsly
from thinc.api import Config

VARIANTS_FILE = "variants.yml"
Overrides = Dict[str, Any]


class UnknownModelName(ValueError):
    """The name is neither a config file nor a variant."""


def read_variants(configs: Path) -> Dict[str, Dict[str, Any]]:
    path = Path(configs) / VARIANTS_FILE
    return dict(srsly.read_yaml(path) or {}) if path.exists() else {}


def resolve(name: str, configs: Path = Path("configs")) -> Tuple[Path, Overrides]:
    """The config file a model name trains with, and the overrides it adds."""
    configs = Path(configs)
    variants = read_variants(configs)
    path = configs / f"{name}.cfg"
    if name in variants and path.exists():
        raise ValueError(
            f"{name!r} is both a variant in {configs / VARIANTS_FILE} and the config {path}: "
            "a name must mean one model, rename one of them"
        )
    if name in variants:
        variant = variants[name]
        base = configs / f"{variant['base']}.cfg"
        if not base.exists():
            raise ValueError(f"variant {name!r} names the base {base}, which does not exist")
        return base, dict(variant.get("overrides") or {})
    if path.exists():
        return path, {}
    known = sorted({p.stem for p in configs.glob("*.cfg")} | set(variants))
    raise UnknownModelName(
        f"no model {name!r}: neither a variant in {configs / VARIANTS_FILE} nor {path} "
        f"(known: {', '.join(known)})"
    )


def config_and_overrides(spec: Union[str, Path], configs: Path = Path("configs")) -> Tuple[Path, Overrides]:
    """A model name (see :func:`resolve`), or the path of a ``.cfg`` file taken as is."""
    if str(spec).endswith(".cfg"):
        return Path(spec), {}
    return resolve(str(spec), configs)


def load_model_config(
    name: str,
    configs: Path = Path("configs"),
    overrides: Optional[Overrides] = None,
    interpolate: bool = True,
) -> Config:
    """The config of a model name (or a .cfg path), with its variant's overrides and then ``overrides``."""
    path, variant = config_and_overrides(name, configs)
    config = Config().from_disk(path, interpolate=False, overrides={**variant, **(overrides or {})})
    return config.interpolate() if interpolate else config


def model_names(configs: Path = Path("configs")) -> Dict[str, str]:
    """Every model name with its description (a variant's, or the config's first comment)."""
    configs = Path(configs)
    names: Dict[str, str] = {}
    for path in sorted(configs.glob("*.cfg")):
        first = path.read_text(encoding="utf8").splitlines()[:1]
        names[path.stem] = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
    for name, variant in read_variants(configs).items():
        names[name] = f"{variant.get('description', '')} (configs/{variant['base']}.cfg + overrides)"
    return names
