"""Measurements of spacy-agban: quality over seeds, speed (against spaCy's ``ner`` and an
earlier commit), per-stage profile, training memory, bulk tagging, detection, lower precision
and decoding choices. Not part of the package; shared helpers are in ``_common``.

Run from the repository root: ``python -m benchmarks.<name> --help`` says how to run one;
results go to ``metrics/``.
"""
