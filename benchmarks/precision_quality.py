"""Lower-precision inference (bf16, int8) and ONNX Runtime (onnx, onnx-int8) against fp32 for a trained transformer
pipeline: F1 in both evaluation columns and speed, side by side in one run, one thread.

    OMP_NUM_THREADS=1 python -m benchmarks.precision_quality \
        training/cased/accurate-s0/model-best corpus/test.spacy --precisions bf16,int8

Loads the pipeline once per precision (fp32, then
``spacy_agban.inference.precision.set_precision`` on a fresh copy), scores each on the split with the
posts' visual context as stored and removed (``spacy_agban.training.evaluation.evaluate_both``,
the two columns of ``python -m spacy_agban evaluate``), then times ``nlp.pipe`` on the
first ``--speed-docs`` posts, repetitions interleaved (fp32, bf16, int8, fp32, ...),
median reported.
"""
import json
import statistics
import time
from pathlib import Path
from typing import Any, Dict, Optional

import typer

from ._common import ROOT, load_average, machine, machine_line, relative, time_pipe, write_report

app = typer.Typer(add_completion=False)


@app.command()
def main(
    model: Path = typer.Argument(..., help="A trained transformer pipeline (fp32)"),
    data: Path = typer.Argument(ROOT / "corpus" / "test.spacy"),
    speed_docs: int = typer.Option(256), reps: int = typer.Option(3),
    batch_size: int = typer.Option(64),
    precisions: str = typer.Option("bf16,int8", help="Comma-separated: bf16, int8, onnx, onnx-int8"),
    output: Path = typer.Option(ROOT / "metrics" / "precision_quality.json"),
    report: Optional[Path] = typer.Option(ROOT / "metrics" / "precision_quality.md"),
) -> None:
    """F1 (both columns) and docs/s of bf16 / int8 against fp32."""
    import spacy
    import torch

    import spacy_agban  # noqa: F401
    import spacy_agban.layers.transformer  # noqa: F401
    from spacy_agban.training.docs_io import read_fresh_docs
    from spacy_agban.training.evaluation import WITH_CONTEXT, WITHOUT_CONTEXT, evaluate_both
    from spacy_agban.inference.precision import PRECISIONS, set_precision

    chosen = [p.strip() for p in precisions.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in PRECISIONS[1:]]
    if unknown or not chosen:
        raise typer.BadParameter(f"--precisions takes {', '.join(PRECISIONS[1:])}, got {precisions!r}")
    torch.set_num_threads(1)
    started = time.perf_counter()
    nlps = {"fp32": spacy.load(model), **{p: set_precision(spacy.load(model), p) for p in chosen}}
    result: Dict[str, Any] = {"machine": machine(), "model": relative(model), "data": relative(data),
                              "torch_threads": torch.get_num_threads(), "scores": {}, "speed": {}}
    for name, nlp in nlps.items():
        scores = evaluate_both(nlp, data, batch_size)
        result["scores"][name] = {
            column: {k: scores[column][k] for k in ("ents_p", "ents_r", "ents_f")}
            for column in (WITH_CONTEXT, WITHOUT_CONTEXT)
        }
        typer.echo(f"{name}: {json.dumps(result['scores'][name])}")
    docs = {name: read_fresh_docs(nlp, data, speed_docs) for name, nlp in nlps.items()}
    seconds: Dict[str, list] = {name: [] for name in nlps}
    for _ in range(reps):
        for name, nlp in nlps.items():
            seconds[name].append(time_pipe(nlp, docs[name], batch_size)[0])
    for name in nlps:
        result["speed"][name] = {"seconds": seconds[name],
                                 "docs_per_s": len(docs[name]) / statistics.median(seconds[name])}
    result["load_average"] = load_average()
    result["wall_s"] = time.perf_counter() - started
    write_report(result, output, report, markdown)


def markdown(result: Dict[str, Any]) -> str:
    s, v = result["scores"], result["speed"]
    lines = [
        f"# Lower precision against fp32: {result['model']} on {result['data']}",
        "",
        f"Measured on: {machine_line(result['machine'])}; torch threads {result['torch_threads']}; "
        f"load average {result['load_average'][0]:.1f} (a loaded machine: read the ratio).",
        "",
        "| weights | F1 caption as stored | F1 caption removed | docs/s (batch 64) |",
        "|---|---|---|---|",
    ]
    for name in s:
        lines.append(f"| {name} | {100 * s[name]['with_context']['ents_f']:.2f} | "
                     f"{100 * s[name]['without_context']['ents_f']:.2f} | {v[name]['docs_per_s']:.1f} |")
    lines.append("")
    for name in s:
        if name == "fp32":
            continue
        d_with = 100 * (s[name]["with_context"]["ents_f"] - s["fp32"]["with_context"]["ents_f"])
        d_without = 100 * (s[name]["without_context"]["ents_f"] - s["fp32"]["without_context"]["ents_f"])
        lines.append(f"- {name} - fp32 F1: {d_with:+.2f} (caption as stored), {d_without:+.2f} (removed); "
                     f"speed-up {v[name]['docs_per_s'] / v['fp32']['docs_per_s']:.2f}x.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app()
