"""A prediction-only setting of the agban pipe chosen on dev: F1 of both evaluation
columns (visual context given / removed) for each value of the setting, for each
trained pipeline, and the value with the best mean over pipelines and columns.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python -m benchmarks.decoding_choice \
        --setting min_confidence --values 0,0.3,0.4,0.45,0.5,0.55,0.6,0.65,0.7 \
        --output metrics/min_confidence.json --report metrics/min_confidence.md \
        training/lr/accurate_lr3e-5_avg-s0/model-best ...

The components before agban (the transformer) run once per column; only the agban
pipe runs once per value, so every value sees the same features. Results are merged
into ``--output`` by model and data, so models can be added one at a time, and the
same command with ``--data corpus/test.spacy --values 0,CHOSEN`` reports the chosen
value on test without choosing anything there.
"""
import statistics
from pathlib import Path
from typing import Any, Dict, List, Sequence

import srsly
import typer

from ._common import ROOT, relative

app = typer.Typer(add_completion=False)
COLUMNS = ("with_context", "without_context")


def score_values(model: Path, data: Path, setting: str, values: Sequence[Any], component: str = "agban",
                 batch_size: int = 64) -> Dict[str, Dict[str, Dict[str, float]]]:
    """{column: {str(value): {ents_p, ents_r, ents_f}}} on ``data``."""
    import spacy
    from spacy.training import Example

    import spacy_agban  # noqa: F401
    from spacy_agban.training.docs_io import fresh_doc, read_references

    nlp = spacy.load(model)
    pipe = nlp.get_pipe(component)
    if not hasattr(pipe, setting):
        raise typer.BadParameter(f"the {component} pipe of {model} has no setting {setting!r}")
    references = list(read_references(nlp, data))
    result: Dict[str, Dict] = {}
    for column in COLUMNS:
        fresh = [fresh_doc(nlp, ref, column == "with_context") for ref in references]
        featurized = list(nlp.pipe(fresh, batch_size=batch_size, disable=[component]))
        result[column] = {}
        for value in values:
            setattr(pipe, setting, value)
            docs = list(pipe.pipe([doc.copy() for doc in featurized], batch_size=batch_size))
            # the pipe's own scorer, as nlp.evaluate (and so spacy evaluate) scores it
            scores = pipe.score([Example(d, r) for d, r in zip(docs, references)])
            result[column][str(value)] = {k: scores[k] for k in ("ents_p", "ents_r", "ents_f")}
            typer.echo(f"  {relative(model)} {column} {setting}={value}: F1 {100 * scores['ents_f']:.2f}")
    return result


def mean_f1(results: Dict[str, Dict], value: str) -> float:
    """F1 at ``value``, averaged over the models and the two columns."""
    return statistics.mean(100 * r[c][value]["ents_f"] for r in results.values() for c in COLUMNS)


def report(results: Dict[str, Dict], values: List[str], choice: bool = True) -> str:
    """The F1 table; ``choice``: the data is the split the value is chosen on (dev)."""
    header = "| model | " + " | ".join(f"{v} | {v}, removed" for v in values) + " |"
    lines = [header, "|---|" + "---|" * (2 * len(values))]
    for model, scores in sorted(results.items()):
        cells = [f"{100 * scores[c][v]['ents_f']:.2f}" for v in values for c in COLUMNS]
        lines.append(f"| `{model}` | " + " | ".join(cells) + " |")
    if results:
        means = [statistics.mean(100 * r[c][v]["ents_f"] for r in results.values()) for v in values for c in COLUMNS]
        label = f"{len(results)} model{'s' if len(results) > 1 else ''}"
        lines.append(f"| mean ({label}) | " + " | ".join(f"{m:.2f}" for m in means) + " |")
        best = max(values, key=lambda v: mean_f1(results, v))
        lines.append("")
        lines.append(f"Mean of the two columns over the models: "
                     + ", ".join(f"{v}: {mean_f1(results, v):.2f}" for v in values)
                     + (f". Best: **{best}**." if choice else
                        f". Highest here: {best} (a report, not a choice: values are chosen on dev)."))
    return "\n".join(lines) + "\n"


def parse_value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    return float(text)


@app.command()
def main(
    models: List[Path] = typer.Argument(..., help="Trained pipelines (model-best folders)"),
    setting: str = typer.Option(..., help="The agban pipe's prediction-only setting, e.g. min_confidence"),
    values: str = typer.Option(..., help="Comma-separated values to score (true/false or numbers)"),
    data: Path = typer.Option(ROOT / "corpus" / "dev.spacy", help="DocBin to score (dev: this is a choice)"),
    output: Path = typer.Option(..., help="Results JSON, merged by model and data"),
    report_path: Path = typer.Option(..., "--report", help="Markdown table"),
) -> None:
    """F1 for each value of the setting, both columns, for each model."""
    parsed = [parse_value(v) for v in values.split(",")]
    for model in models:
        if not (model / "config.cfg").exists():
            raise typer.BadParameter(f"{model} is not a saved spaCy pipeline (no config.cfg)")
    stored: Dict[str, Dict] = srsly.read_json(output) if output.exists() else {}
    key = f"{setting} on {relative(data)}"
    results = stored.setdefault(key, {})
    for model in models:
        scored = score_values(model, data, setting, parsed)
        results.setdefault(relative(model), {c: {} for c in COLUMNS})
        for column in COLUMNS:
            results[relative(model)][column].update(scored[column])
    output.parent.mkdir(parents=True, exist_ok=True)
    srsly.write_json(output, stored)
    shown = [str(v) for v in parsed]
    complete = {m: r for m, r in results.items() if all(v in r[c] for v in shown for c in COLUMNS)}
    text = report(complete, shown, choice=data.resolve() == (ROOT / "corpus" / "dev.spacy").resolve())
    report_path.write_text(
        f"# `{setting}` at decoding, on `{relative(data)}`\n\n" + text
        + f"\nRe-run: `OMP_NUM_THREADS=1 python -m benchmarks.decoding_choice --setting {setting} "
        f"--values {values} --data {relative(data)} --output {relative(output)} "
        f"--report {relative(report_path)} MODEL...`\n", encoding="utf-8")
    typer.echo(text)


if __name__ == "__main__":
    app()
