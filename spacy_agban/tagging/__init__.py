"""Tagging posts in bulk: ``python -m spacy_agban tag`` on one machine or on Ray Data.

- :mod:`.core`: the per-batch steps (parse posts, read + hash images, detect,
  tag) on plain columns, shared by both engines so that they cannot drift.
- :mod:`.posts`: reading JSONL/Parquet posts by parts and writing numbered
  output parts (both engines: the same parts, the same resuming).
- :mod:`.models`: what a saved pipeline reads, decided once per job
  (:class:`~.models.PipelineReads`), and loading it in a worker.
- :mod:`.job`: a job's record (model, input and settings by content) and the
  checks both engines make before they write anything.
- :mod:`.local`: the single-machine engine.
- :mod:`.ray_engine`: the same job on Ray Data (imported only when asked for).
- :mod:`.features`: a Parquet features dataset keyed by image content hash and
  detector signature, and moving features to and from the SQLite store.

The ``tag``, ``detect`` and ``features`` commands are in :mod:`spacy_agban.cli.tag`.
Nothing here imports ray at module level: the package works without it.
"""
