"""Training glue: data in, trained pipeline out, and its evaluation.

- :mod:`.convert`: the CoNLL files and captions -> DocBins.
- :mod:`.vectors`: GloVe -> spaCy vectors.
- :mod:`.corpus`: the corpus reader that keeps each post's visual context.
- :mod:`.optimizer`: a per-component learning-rate scale.
- :mod:`.loggers`: the console logger with the extra losses.
- :mod:`.variants`: model names -> a config and its overrides.
- :mod:`.evaluation`, :mod:`.docs_io`: scoring with and without the visual context.
"""
