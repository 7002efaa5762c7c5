"""Thinc glue between spaCy and the torch model.

- :mod:`.featurize`: docs and their units -> the padded arrays the torch model reads.
- :mod:`.shim`: the PyTorch shim that updates weights in place and caches prediction.
- :mod:`.transformer`: the transformer listener and the caption-in-input transformer.
- :mod:`.static_vectors`: the one lookup of word-vector rows, and the spaCy baseline's
  embedding by lowercase form.
"""
