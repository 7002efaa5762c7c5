"""Doc extensions that carry a post's visual context through spaCy."""
from spacy.tokens import Doc

#: Inputs: set by the user (or the corpus) before the pipeline runs.
INPUT_EXTENSIONS = ("image", "image_caption")


def install_extensions() -> None:
    """Register the Doc attributes once (safe to call repeatedly).

    - ``doc._.image``: the post's image: a path string (what a DocBin stores), or at
      run time a ``pathlib.Path`` or a ``PIL.Image.Image``.
    - ``doc._.image_caption``: alt text or a generated caption for the image.
    - ``doc._.visual_units``: filled by the ``agban`` component with what it actually
      used for this doc: one dict per unit (``source``, ``label``, ``score``, ``box``).
    - ``doc._.agban_attention``: when the component records it, the attention map
      (tokens x units) and the gate values per token.
    """
    for name in ("image", "image_caption", "visual_units", "agban_attention"):
        if not Doc.has_extension(name):
            Doc.set_extension(name, default=None)


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
