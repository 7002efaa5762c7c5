"""Training cost per step of several configurations, interleaved in one process.

    python -m benchmarks.train_step_cost \
        --variant paper="concat components.agban.model.visual_dropout=0 components.agban.model.cross_view=0" \
        --variant default="concat" --steps 40

Each variant is a config plus ``KEY=VALUE`` overrides. All pipelines are initialized
first, then the same real training batches go through ``nlp.update`` in turn
(A B C A B C ...), so a noisy machine slows every variant alike. Reports the median
seconds per step, the ratio to the first variant and one epoch extrapolated (dev
evaluation not included).
"""
import json
import random
import shlex
import statistics
import time
from pathlib import Path
from typing import Dict, List

import typer

from .paths import ROOT

app = typer.Typer(add_completion=False)


def parse_value(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def init_variant(spec: str, seed: int):
    from spacy.schemas import ConfigSchemaTraining
    from spacy.training.initialize import init_nlp
    from spacy.util import registry, resolve_dot_names

    import spacy_agban  # noqa: F401  (registers the component)

    config_path, *pairs = shlex.split(spec)
    overrides: Dict[str, object] = {"system.seed": seed}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"override {pair!r} is not KEY=VALUE")
        overrides[key] = parse_value(value)
    from spacy_agban.training.variants import load_model_config

    config = load_model_config(config_path, ROOT / "configs", overrides=overrides, interpolate=False)
    nlp = init_nlp(config, use_gpu=-1)
    T = registry.resolve(nlp.config.interpolate()["training"], schema=ConfigSchemaTraining)
    (train_corpus,) = resolve_dot_names(nlp.config.interpolate(), [T["train_corpus"]])
    examples = list(train_corpus(nlp))
    random.Random(seed).shuffle(examples)
    return nlp, list(T["batcher"](examples)), T["optimizer"], T["dropout"]


@app.command()
def main(
    variant: List[str] = typer.Option(..., help='NAME="CONFIG KEY=VALUE ..." (repeat; the first is the reference)'),
    steps: int = typer.Option(40, help="Timed steps per variant"),
    warmup: int = typer.Option(3, help="Untimed steps per variant first"),
    seed: int = typer.Option(0),
    output: Path = typer.Option(ROOT / "metrics" / "train_step_cost.json"),
) -> None:
    named = [item.partition("=")[::2] for item in variant]
    runs = {name: init_variant(spec, seed) for name, spec in named}
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for step in range(warmup + steps):
        for name, (nlp, batches, optimizer, dropout) in runs.items():
            batch = batches[step % len(batches)]
            tick = time.perf_counter()
            nlp.update(batch, drop=dropout, sgd=optimizer, losses={})
            if step >= warmup:
                times[name].append(time.perf_counter() - tick)
    reference = statistics.median(times[named[0][0]])
    result = {}
    for name, spec in named:
        median = statistics.median(times[name])
        result[name] = {"spec": spec, "median_step_seconds": median, "ratio": median / reference,
                        "epoch_seconds_extrapolated": median * len(runs[name][1]), "steps": steps}
        typer.echo(f"{name}: {1000 * median:.1f} ms/step, {median / reference:.2f}x, "
                   f"epoch ≈ {median * len(runs[name][1]):.0f} s")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    app()
