"""Model names: a config file in configs/, or a variant of one in configs/variants.yml.

spaCy's config system has no includes, so a model that differs from a shipped
config in a few settings is written as that config (its ``base``) plus the
overrides ``spacy train`` would take on its command line. Every name means one
model: a name that is both a variant and a ``<name>.cfg`` file is an error. The
quality bench (``--rows``), ``python -m spacy_agban train`` and ``project.yml``
(``--vars.config``) resolve names here, so they train the same model for a name.
"""
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import srsly
from thinc.api import Config

VARIANTS_FILE = "variants.yml"
VARIANT_KEYS = ("base", "description", "overrides")
Overrides = Dict[str, Any]


class UnknownModelName(ValueError):
    """The name is neither a config file nor a variant."""


class BadVariant(ValueError):
    """variants.yml cannot be read, or one of its entries is malformed."""


def read_variants(configs: Path) -> Dict[str, Any]:
    """The entries of ``configs/variants.yml`` by name (each checked by :func:`variant_problem`)."""
    path = Path(configs) / VARIANTS_FILE
    if not path.exists():
        return {}
    try:
        data = srsly.read_yaml(path)
    except (OSError, ValueError) as err:  # srsly's "Invalid YAML: ..." is a ValueError
        text = " ".join(str(err).split("To suppress this check")[0].split())
        raise BadVariant(f"cannot read {path}: {text}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BadVariant(
            f"{path} must map model names to {{base, description, overrides}}, not be a {type(data).__name__}"
        )
    return dict(data)


def variant_problem(name: Any, variant: Any, configs: Path) -> Optional[str]:
    """What is wrong with one entry of variants.yml (None if nothing)."""
    where = f"variant {name!r} in {Path(configs) / VARIANTS_FILE}"
    if not isinstance(name, str):
        return f"{where}: a model name must be a string"
    if not isinstance(variant, dict):
        return f"{where} must be a mapping with base, description and overrides, not {_kind(variant)}"
    unknown = sorted(str(key) for key in variant if key not in VARIANT_KEYS)
    if unknown:
        return f"{where} has unknown keys {unknown} (known: {', '.join(VARIANT_KEYS)})"
    base = variant.get("base")
    if not isinstance(base, str) or not base:
        return f"{where} needs base: the name of a config in {configs} (e.g. base: concat)"
    if not (Path(configs) / f"{base}.cfg").exists():
        return f"{where} names the base {Path(configs) / f'{base}.cfg'}, which does not exist"
    overrides = variant.get("overrides")
    if overrides is not None and not isinstance(overrides, dict):
        return f"{where}: overrides must map config settings (section.key) to values, not {_kind(overrides)}"
    if not all(isinstance(key, str) and "." in key for key in overrides or {}):
        return f"{where}: each override must be a setting named section.key"
    description = variant.get("description")
    if description is not None and not isinstance(description, str):
        return f"{where}: description must be a string, not {_kind(description)}"
    return None


def _kind(value: Any) -> str:
    return f"a {type(value).__name__} ({value!r})" if not isinstance(value, (dict, list)) else f"a {type(value).__name__}"


def problems(configs: Path = Path("configs")) -> List[str]:
    """Every broken or conflicting model name: malformed entries, names that are both a
    variant and a config file, overrides that do not apply to their base."""
    configs = Path(configs)
    try:
        variants = read_variants(configs)
    except BadVariant as err:
        return [str(err)]
    found = []
    for name, variant in variants.items():
        problem = variant_problem(name, variant, configs)
        if problem is None and (configs / f"{name}.cfg").exists():
            problem = _conflict(name, configs)
        if problem is None:
            try:
                load_model_config(name, configs, interpolate=False)
            except Exception as err:  # thinc's errors of an override that does not apply
                problem = f"variant {name!r}: its overrides do not apply to its base: {' '.join(str(err).split())}"
        if problem is not None:
            found.append(problem)
    return found


def _conflict(name: str, configs: Path) -> str:
    return (
        f"{name!r} is both a variant in {configs / VARIANTS_FILE} and the config {configs / f'{name}.cfg'}: "
        "a name must mean one model, rename one of them"
    )


def resolve(name: str, configs: Path = Path("configs")) -> Tuple[Path, Overrides]:
    """The config file a model name trains with, and the overrides it adds."""
    configs = Path(configs)
    variants = read_variants(configs)
    path = configs / f"{name}.cfg"
    if name in variants and path.exists():
        raise ValueError(_conflict(name, configs))
    if name in variants:
        variant = variants[name]
        problem = variant_problem(name, variant, configs)
        if problem is not None:
            raise BadVariant(problem)
        return configs / f"{variant['base']}.cfg", dict(variant.get("overrides") or {})
    if path.exists():
        return path, {}
    known = sorted({p.stem for p in configs.glob("*.cfg")} | {str(n) for n in variants})
    if not known:
        where = "does not exist" if not configs.is_dir() else f"holds no .cfg file and no {VARIANTS_FILE}"
        raise UnknownModelName(
            f"no model {name!r}: the configs folder {configs} ({configs.resolve()}) {where}"
        )
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
        if variant_problem(name, variant, configs) is not None:
            names[str(name)] = "(a broken entry)"
            continue
        names[name] = f"{variant.get('description') or ''} (configs/{variant['base']}.cfg + overrides)"
    return names
