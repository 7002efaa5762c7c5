"""Where agban's inference time goes: a cProfile of ``nlp.pipe`` and its throughput.

    python -m benchmarks.inference_profile training/runs/agban-s0/model-best

1. cProfile of ``nlp.pipe`` over the test docs: the functions with the most own time.
2. Words per second of the same ``nlp.pipe``, the median of ``--reps`` timed passes
   (after a short warm-up pass).

File names in the profile are recorded relative to the repository (``<site-packages>/``
and ``<python>/`` for installed code), so the JSON holds no machine's own paths.
"""
import cProfile
import io
import pstats
import statistics
from pathlib import Path
from typing import List

import srsly
import typer

from spacy_agban.training.docs_io import read_fresh_docs

from .machine import machine, machine_line
from .paths import ROOT, relative, without_machine_paths
from .speed import load, time_pipe

app = typer.Typer(add_completion=False)


def top_functions(nlp, docs: List, n: int = 15) -> str:
    """The ``n`` functions with the most own time in one ``nlp.pipe`` pass over ``docs``."""
    profiler = cProfile.Profile()
    profiler.enable()
    time_pipe(nlp, docs)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(n)
    return without_machine_paths(out.getvalue())


@app.command()
def main(
    model: str = typer.Argument("training/runs/agban-s0/model-best"),
    test: Path = typer.Option(ROOT / "corpus" / "test.spacy"),
    limit: int = typer.Option(1000, help="First N test docs (0: all)"),
    reps: int = typer.Option(5),
    output: Path = typer.Option(ROOT / "metrics" / "inference_profile.json"),
) -> None:
    """Profile agban inference and time it."""
    nlp = load(model)
    docs = read_fresh_docs(nlp, test, limit)
    words = sum(len(d) for d in docs)
    profile = top_functions(nlp, docs)
    time_pipe(nlp, docs[:16])
    seconds = [time_pipe(nlp, docs) for _ in range(reps)]
    result = {
        "machine": machine(), "model": relative(ROOT / model), "test": relative(test),
        "docs": len(docs), "words": words, "seconds": seconds,
        "words_per_s": words / statistics.median(seconds), "profile": profile,
    }
    srsly.write_json(output, result)
    typer.echo(f"{machine_line(result['machine'])}\n{len(docs)} docs, {words} words")
    typer.echo(f"{result['words_per_s']:.0f} words/s (median of {reps})")
    typer.echo("--- profile ---\n" + profile)


if __name__ == "__main__":
    app()
