"""Measurements of spacy-agban: quality over seeds, speed, memory. Not part of the package.

Run from the repository root, ``python -m benchmarks`` lists them and
``python -m benchmarks.<name> --help`` says how to run one; results go to ``metrics/``.
"""
