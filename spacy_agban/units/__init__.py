"""Visual units: every source of the vectors the fusion attends over.

- :mod:`.base`: what a source is (:class:`~.base.UnitSource`), a unit, a doc's units,
  and the caption-word units (``spacy_agban.CaptionUnits.v1``).
- :mod:`.caption_words`: which words of a caption are content words.
- :mod:`.caption_encoder`: contextual caption units from a frozen encoder
  (``spacy_agban.CaptionEncoderUnits.v1``).
- :mod:`.objects`: the top-k detected objects of ``doc._.image`` (``spacy_agban.ObjectUnits.v1``).
"""
