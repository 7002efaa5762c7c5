"""Doc extensions that carry a post's visual context through spaCy."""
import sys
from pathlib import PurePath
from typing import Any, Callable, Optional

import srsly
from spacy.tokens import Doc, Span

#: Inputs: set by the user (or the corpus) before the pipeline runs.
INPUT_EXTENSIONS = ("image", "image_caption")
#: The ``doc.spans`` attribute naming the component that scored a group (with "scores").
SCORED_BY = "component"


def install_extensions() -> None:
    """Register the Doc attributes once (safe to call repeatedly).

    - ``doc._.image``: the post's image: a path string (what a DocBin stores), or at
      run time a ``pathlib.Path`` or a ``PIL.Image.Image``.
    - ``doc._.image_caption``: alt text or a generated caption for the image.
    - ``doc._.image_caption_source``: where the caption came from, set by the
      ``image_captioner`` component: ``{"origin": "given"}``, or ``{"origin":
      "generated" | "failed", "model": ...}`` (plus ``"reason"`` when it failed);
      None where no captioner looked at the doc.
    - ``doc._.visual_units``: filled by the ``agban`` component with what it actually
      used for this doc: one dict per unit (``source``, ``label``, ``score``, ``box``).
    - ``doc._.agban_attention``: when the component records it, the attention map
      (tokens x units) and the gate values per token.
    - ``span._.agban_confidence``: a getter: the entity's confidence as the component
      stored it in ``doc.spans`` (None where it stored none).
    """
    for name in ("image", "image_caption", "image_caption_source", "visual_units", "agban_attention"):
        if not Doc.has_extension(name):
            Doc.set_extension(name, default=None)
    if not Span.has_extension("agban_confidence"):
        Span.set_extension("agban_confidence", getter=stored_confidence)
    srsly.msgpack_encoders.register("spacy_agban.visual_input", func=encode_visual_input)


def stored_confidence(span: Span) -> Optional[float]:
    """The confidence of ``span`` in a ``doc.spans`` group the agban component scored
    (spancat's layout: ``attrs["scores"]`` aligned with the spans), found by start,
    end and label; None if no such group holds it (``store_confidence`` off, or not
    an entity the component predicted)."""
    for group in span.doc.spans.values():
        if SCORED_BY not in group.attrs or "scores" not in group.attrs:
            continue
        for stored, score in zip(group, group.attrs["scores"]):
            if (stored.start, stored.end, stored.label) == (span.start, span.end, span.label):
                return float(score)
    return None


def encode_visual_input(obj: Any, chain: Optional[Callable[[Any], Any]] = None) -> Any:
    """msgpack encoder (srsly) for what ``doc._.image`` may hold at run time.

    ``doc.to_bytes`` packs ``user_data`` with msgpack, which knows neither a Path nor
    a PIL image; ``nlp.pipe(n_process=2)`` sends every doc back from its workers that
    way, and a DocBin stores docs that way. A Path is packed as its string (the doc
    that comes back holds the string); an in-memory image stops with an error that
    says what to do instead.
    """
    if isinstance(obj, PurePath):
        return str(obj)
    pil_image = sys.modules.get("PIL.Image")  # not imported: obj cannot be a PIL image
    if pil_image is not None and isinstance(obj, pil_image.Image):
        raise TypeError(
            "an in-memory PIL image (doc._.image) cannot be serialized by doc.to_bytes, a "
            "DocBin or nlp.pipe(n_process > 1): save the image to a file and set "
            "doc._.image to its path."
        )
    return obj if chain is None else chain(obj)


def copy_visual_context(source: Doc, target: Doc) -> None:
    """Copy the visual *inputs* (image, caption) of one doc onto another.

    Used where spaCy builds a predicted doc from the reference's text alone
    (training readers, ``spacy evaluate``): the context is input, not annotation,
    so the predicted doc must see it too.
    """
    for name in INPUT_EXTENSIONS:
        value = source._.get(name)
        if value is not None and target._.get(name) is None:
            target._.set(name, value)
