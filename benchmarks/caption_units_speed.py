"""Inference cost of contextual caption units against word-vector caption units, side by side.

    python -m benchmarks.caption_units_speed \
        --model words=training/runs/agban-s0/model-best \
        --model encoder=training/bench/agban_caption_encoder-s0/model-best

Each repetition times ``nlp.pipe`` over the same test docs for every pipeline in turn
(A B A B ...). The caption encoder caches units per caption, so every repetition
starts with an empty cache: the numbers are for captions never seen before. The docs
are the test posts as a user passes them (text, image, caption); a pipeline with caption
units only reads no image.
Writes JSON and prints a Markdown table.
"""
import os
import statistics
import time
from pathlib import Path
from typing import List

import spacy
import srsly
import torch
import typer

import spacy_agban  # noqa: F401  (registrations)
from spacy_agban.training.docs_io import fresh_doc, read_references

from .machine import machine, machine_line
from .paths import ROOT, relative


def main(
    model: List[str] = typer.Option(..., help="NAME=PATH of a trained agban pipeline (repeat)"),
    test: Path = typer.Option(ROOT / "corpus" / "test.spacy"),
    limit: int = typer.Option(1000, help="First N test docs (0: all)"),
    reps: int = typer.Option(3),
    output: Path = typer.Option(ROOT / "metrics" / "caption_units_speed.json"),
) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    nlps = {}
    for item in model:
        name, _, path = item.partition("=")
        nlps[name] = spacy.load(path)
    first = next(iter(nlps.values()))
    gold = list(read_references(first, test))
    gold = gold[:limit] if limit else gold
    words = sum(len(d) for d in gold)
    for nlp in nlps.values():  # warm-up: loads the caption encoder (lazy) outside the timing
        list(nlp.pipe([fresh_doc(nlp, g) for g in gold[:10]]))
    seconds = {name: [] for name in nlps}
    for _ in range(reps):
        for name, nlp in nlps.items():
            cache = getattr(nlp.get_pipe("agban").caption_units, "_cache", None)
            if cache is not None:
                cache.clear()
            docs = [fresh_doc(nlp, g) for g in gold]
            start = time.perf_counter()
            for _ in nlp.pipe(docs):
                pass
            seconds[name].append(time.perf_counter() - start)
    result = {"machine": machine(), "docs": len(gold), "words": words, "reps": reps,
              "models": {name: relative(path) for name, path in (item.partition("=")[::2] for item in model)}, "seconds": seconds}
    srsly.write_json(output, result)
    typer.echo(f"{machine_line(result['machine'])}; {len(gold)} test docs, {reps} interleaved reps, cold caption cache\n")
    typer.echo("| pipeline | words/s | docs/s |\n|---|---|---|")
    for name, values in seconds.items():
        median = statistics.median(values)
        typer.echo(f"| {name} | {words / median:,.0f} | {len(gold) / median:,.1f} |")


if __name__ == "__main__":
    typer.run(main)
