"""Which linear layers int8 inference quantizes, chosen on dev: F1 of both evaluation
columns for several layer choices against fp32, one thread, one run.

    OMP_NUM_THREADS=1 python -m benchmarks.int8_layers training/cased/accurate-s0/model-best

The rule that wins (mean of the two dev columns) is what ``spacy_agban.int8.keeps_fp32``
keeps in fp32; the test split is scored only for that rule (``benchmarks/int8_quality.py``).
"""
import os
from pathlib import Path
from typing import Callable, Dict, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import srsly  # noqa: E402
import typer  # noqa: E402

from .paths import ROOT  # noqa: E402

# name of a choice -> which linear layers stay fp32 (None: no quantization at all)
CHOICES: Dict[str, Optional[Callable[[str], bool]]] = {
    "fp32": None,
    "all layers": lambda n: False,
    "all but the FFN output": lambda n: n.endswith("output.dense") and "attention" not in n,
    "the FFN intermediate only": lambda n: "intermediate" not in n,
    "all but the last 2 layers": lambda n: "layer.4." in n or "layer.5." in n,
    "all but every output projection": lambda n: n.endswith("output.dense"),
    "all but the FFN output, query and key (shipped)": lambda n: (
        (n.endswith("output.dense") and "attention" not in n) or n.endswith((".query", ".key"))),
}


def main(
    model: Path = typer.Argument(..., help="A trained transformer pipeline (fp32)"),
    data: Path = typer.Argument(ROOT / "corpus" / "dev.spacy"),
    output: Path = typer.Option(ROOT / "metrics" / "int8_layers.json"),
) -> None:
    import spacy
    import torch

    from spacy_agban.evaluation import evaluate_both
    from spacy_agban.int8 import transformer_components

    torch.set_num_threads(1)
    results = {}
    for name, keep in CHOICES.items():
        nlp = spacy.load(model)
        if keep is not None:
            for pipe in transformer_components(nlp):
                hf = pipe.model.layers[0].shims[0]._model
                hf.eval()
                layers = {n for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear) and not keep(n)}
                torch.ao.quantization.quantize_dynamic(hf, layers, dtype=torch.qint8, inplace=True)
        scores = {k: round(100 * v["ents_f"], 2) for k, v in evaluate_both(nlp, data, 64).items()}
        results[name] = {**scores, "mean": round(sum(scores.values()) / len(scores), 2)}
        typer.echo(f"{name}: {results[name]}")
    srsly.write_json(output, {"model": str(model), "data": str(data), "f1": results})


if __name__ == "__main__":
    typer.run(main)
