"""Whether decoding only valid BIO sequences pays, chosen on dev: F1 of both evaluation
columns (visual context given / removed) with the agban pipe's ``bio_constraints`` off
and on, for each trained pipeline, one run.

    OMP_NUM_THREADS=1 python -m benchmarks.bio_constraints_choice \
        training/cased/accurate-s0/model-best training/cased/bilstm_crf_trf-s0/model-best

The components before agban (the transformer) run once per column; only the agban
pipe runs twice, so the two settings see the same features. Results are merged into
``--output`` by model, so models can be added one at a time; the report gives each
model's change and the mean change over all of them.
"""
import os
import statistics
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import srsly  # noqa: E402
import typer  # noqa: E402

from . import decoding_choice  # noqa: E402
from .paths import ROOT, relative  # noqa: E402

app = typer.Typer(add_completion=False)
COLUMNS = decoding_choice.COLUMNS
SETTINGS = ("off", "on")


def score_model(model: Path, data: Path, component: str = "agban", batch_size: int = 64) -> Dict[str, Dict]:
    """{column: {setting: {ents_p, ents_r, ents_f}}} on ``data``."""
    scored = decoding_choice.score_values(model, data, "bio_constraints", [False, True], component, batch_size)
    return {column: {setting: scored[column][str(value)] for setting, value in zip(SETTINGS, (False, True))}
            for column in COLUMNS}


def report(results: Dict[str, Dict]) -> str:
    lines = [
        "| model | F1 off | F1 on | change | F1 off, context removed | F1 on, removed | change |",
        "|---|---|---|---|---|---|---|",
    ]
    changes: Dict[str, List[float]] = {column: [] for column in COLUMNS}
    for model, scores in sorted(results.items()):
        cells = []
        for column in COLUMNS:
            off, on = (100 * scores[column][s]["ents_f"] for s in SETTINGS)
            changes[column].append(on - off)
            cells += [f"{off:.2f}", f"{on:.2f}", f"{on - off:+.2f}"]
        lines.append(f"| `{model}` | " + " | ".join(cells) + " |")
    if results:
        means = [statistics.mean(changes[column]) for column in COLUMNS]
        lines.append(f"| mean change ({len(results)} models) | | | **{means[0]:+.2f}** | | | **{means[1]:+.2f}** |")
    return "\n".join(lines) + "\n"


@app.command()
def main(
    models: List[Path] = typer.Argument(..., help="Trained pipelines (model-best folders)"),
    data: Path = typer.Option(ROOT / "corpus" / "dev.spacy", help="DocBin to score (dev: this is a choice)"),
    output: Path = typer.Option(ROOT / "metrics" / "bio_constraints.json", help="Results, merged by model"),
    report_path: Path = typer.Option(ROOT / "metrics" / "bio_constraints.md", "--report", help="Markdown table"),
) -> None:
    """F1 with bio_constraints off and on, both columns, for each model."""
    results = srsly.read_json(output) if output.exists() else {}
    for model in models:
        if not (model / "config.cfg").exists():
            raise typer.BadParameter(f"{model} is not a saved spaCy pipeline (no config.cfg)")
        results[relative(model)] = {**score_model(model, data), "data": relative(data)}
    output.parent.mkdir(parents=True, exist_ok=True)
    srsly.write_json(output, results)
    text = report(results)
    report_path.write_text(f"# BIO constraints at decoding, chosen on `{relative(data)}`\n\n" + text
                           + "\nRe-run: `OMP_NUM_THREADS=1 python -m benchmarks.bio_constraints_choice MODEL...`\n",
                           encoding="utf-8")
    typer.echo(text)


if __name__ == "__main__":
    app()
