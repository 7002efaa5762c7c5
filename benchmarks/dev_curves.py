"""Dev F1 of several trainings, step by step, side by side (a Markdown table).

    python -m benchmarks.dev_curves raw=training/cased/accurate-s0 \
        averaged=training/averaged/accurate-s0 --output metrics/averaged/dev_curves.md

Each argument is ``LABEL=TRAINING_OUTPUT`` (or just the folder): its JSONL log, or the
console table while a run is still going (``spacy_agban.cli.plots.find_training_log``). The
best step of each run is in bold; the last rows say each run's best, the step it came at
and the step it stopped at. For choices on dev between runs that differ in one setting
(same seed, same data order): the step-by-step rows show where the difference comes from.
"""
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import typer

from spacy_agban.cli.plots import find_training_log, read_training_log

from .paths import relative

app = typer.Typer(add_completion=False)


def parse_run(value: str) -> Tuple[str, Path]:
    label, sep, path = value.partition("=")
    if not sep:
        return Path(value).name, Path(value)
    if not label or not path:
        raise typer.BadParameter(f"a run is LABEL=FOLDER or FOLDER, got {value!r}")
    return label, Path(path)


def dev_scores(folder: Path) -> Dict[int, float]:
    try:
        curves = read_training_log(find_training_log(folder))
    except FileNotFoundError as error:
        raise typer.BadParameter(str(error)) from None
    return {step: f1 for step, f1 in zip(curves.steps, curves.dev_f1) if f1 is not None}


def table(runs: List[Tuple[str, Path]], scores: List[Dict[int, float]]) -> str:
    steps = sorted({step for run in scores for step in run})
    best: List[Optional[Tuple[int, float]]] = [
        max(run.items(), key=lambda item: (item[1], -item[0])) if run else None for run in scores
    ]
    lines = ["| step | " + " | ".join(label for label, _ in runs) + " |",
             "|---|" + "---|" * len(runs)]
    for step in steps:
        cells = []
        for run, top in zip(scores, best):
            value = run.get(step)
            text = "" if value is None else f"{100 * value:.2f}"
            cells.append(f"**{text}**" if top is not None and top[0] == step else text)
        lines.append(f"| {step:,} | " + " | ".join(cells) + " |")
    lines.append("| best (step) | " + " | ".join(
        "—" if top is None else f"{100 * top[1]:.2f} ({top[0]:,})" for top in best) + " |")
    lines.append("| last step | " + " | ".join(
        f"{max(run):,}" if run else "—" for run in scores) + " |")
    lines.append("")
    lines.append("Runs: " + "; ".join(f"{label} = `{relative(path)}`" for label, path in runs))
    return "\n".join(lines) + "\n"


@app.command()
def main(
    runs: List[str] = typer.Argument(..., help="LABEL=TRAINING_OUTPUT (or just the folder), one per run"),
    output: Optional[Path] = typer.Option(None, help="Write the table here too"),
) -> None:
    """Dev F1 per evaluation step for each run, side by side."""
    parsed = [parse_run(value) for value in runs]
    text = table(parsed, [dev_scores(path) for _, path in parsed])
    typer.echo(text)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    app()
