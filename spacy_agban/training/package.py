"""The meta.json that ``spacy package`` turns into a pipeline package and its model card.

``spacy package`` reads the pipeline's meta.json: its ``description`` and ``notes`` become
the README (the model card), ``performance`` its accuracy table, ``sources`` and
``license`` the data lines, ``requirements`` the package's install requirements. A
trained pipeline's meta.json has none of what a user needs from a card (training writes
dev scores only), so :func:`package_meta` fills it from the pipeline's own test scores,
both columns of ``python -m spacy_agban evaluate`` (visual context as stored, and
removed), and from the data's terms.

Requirements: ``spacy package`` adds the distributions whose registered functions the
config names (spacy-agban, spacy-transformers); spacy-agban is declared here as well, so
that the card names it whatever spaCy detects. A transformer pipeline needs no encoder
package at load time: it reads its weights and tokenizer from its own folder.
"""
import re
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Optional, Union

import srsly
from spacy.util import get_minor_version_range

from .evaluation import WITH_CONTEXT, WITHOUT_CONTEXT

PLUGIN = "spacy-agban"
DATA_SOURCE = {
    "name": "Twitter-2015 multimodal NER (Zhang et al., AAAI 2018), original labels",
    "url": "https://github.com/jefferyYu/UMT",
    "license": "research use only: the copyrights of Twitter and the data set providers apply",
}
DATA_TERMS = (
    "Trained on Twitter-2015 (Zhang et al., AAAI 2018, as redistributed by the UMT repository) "
    "with automatic BLIP-2 captions of its images. The data's terms: using it means accepting the "
    "copyrights set by Twitter and the data set providers; research use only. The same holds for "
    "this pipeline, whatever the licence of the code that runs it."
)


def requirement(distribution: str) -> str:
    """``name>=X.Y.Z,<X.Y+1.0`` for the installed version, as ``spacy package`` writes them."""
    try:
        version = metadata.version(distribution)
    except metadata.PackageNotFoundError:
        raise ValueError(
            f"{distribution} is not installed here, but the pipeline needs it: install it, so "
            "that the package can declare the version it was built with"
        ) from None
    return f"{distribution}{get_minor_version_range(version)}"


def package_name(name: str) -> str:
    """A name ``spacy package`` accepts (a Python identifier, no runs of underscores)."""
    cleaned = re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9_]", "_", name)).strip("_")
    if not cleaned or not cleaned[0].isalpha():
        raise ValueError(f"cannot make a package name of {name!r}: start it with a letter")
    return cleaned


def _score(scores: Dict[str, Any], key: str) -> float:
    value = scores.get(key)
    return float(value) if value is not None else 0.0


def scores_table(scores: Dict[str, Dict[str, Any]]) -> str:
    """The two columns as a Markdown table (percent)."""
    rows = ["| visual context | P | R | F1 |", "|---|---|---|---|"]
    for key, name in ((WITH_CONTEXT, "as stored (caption/image given)"), (WITHOUT_CONTEXT, "removed (text only)")):
        s = scores[key]
        rows.append(f"| {name} | {100 * _score(s, 'ents_p'):.2f} | {100 * _score(s, 'ents_r'):.2f} "
                    f"| {100 * _score(s, 'ents_f'):.2f} |")
    return "\n".join(rows)


def package_meta(
    model: Union[str, Path],
    scores: Dict[str, Dict[str, Any]],
    name: Optional[str] = None,
    version: Optional[str] = None,
    evaluated_on: str = "the Twitter-2015 test split (3,257 tweets)",
) -> Dict[str, Any]:
    """The pipeline's meta.json with the card filled: ``scores`` as the evaluate command
    writes them (``with_context`` / ``without_context``)."""
    model = Path(model)
    missing = [key for key in (WITH_CONTEXT, WITHOUT_CONTEXT) if key not in scores]
    if missing:
        raise ValueError(
            f"the scores have no {' and no '.join(missing)} column: pass the JSON that "
            "`python -m spacy_agban evaluate MODEL DATA --output FILE` writes"
        )
    meta = srsly.read_json(model / "meta.json")
    if name is not None:
        meta["name"] = package_name(name)
    if version is not None:
        meta["version"] = version
    with_context, without_context = scores[WITH_CONTEXT], scores[WITHOUT_CONTEXT]
    meta["description"] = (
        "Multimodal named entity recognition for social media posts (spacy-agban): reads a post's "
        "text and, where given, its image caption (doc._.image_caption) or image (doc._.image). "
        f"Test F1 {100 * _score(with_context, 'ents_f'):.2f} with the visual context, "
        f"{100 * _score(without_context, 'ents_f'):.2f} without it. Research use only (the training data's terms)."
    )
    meta["notes"] = "\n\n".join([
        f"### Scores\n\nOn {evaluated_on}, with the posts' visual context as stored and removed "
        "(most real posts come without one):\n\n" + scores_table(scores),
        "Each entity has a confidence, the smallest CRF marginal probability of its tokens' tags: "
        "`span._.agban_confidence`, and `attrs[\"scores\"]` of the `doc.spans` group named by the "
        "agban component's `spans_key` (default `agban`).",
        "### Data and terms\n\n" + DATA_TERMS,
    ])
    performance = {key: with_context.get(key) for key in ("ents_f", "ents_p", "ents_r")}
    performance.update({f"{key}_without_context": without_context.get(key) for key in ("ents_f", "ents_p", "ents_r")})
    performance["ents_per_type"] = with_context.get("ents_per_type")
    meta["performance"] = performance
    meta["sources"] = [DATA_SOURCE]
    meta["license"] = "research use only (data terms); code: MIT"
    names = {re.split(r"[<>=!~ ;\[]", req, maxsplit=1)[0].lower() for req in meta.get("requirements", [])}
    if PLUGIN not in names:
        meta.setdefault("requirements", []).append(requirement(PLUGIN))
    return meta
