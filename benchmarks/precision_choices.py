"""Which lower-precision inference the transformer pipelines offer, chosen on dev: F1 of
both evaluation columns for each choice against fp32, one thread, one run.

    OMP_NUM_THREADS=1 python -m benchmarks.precision_choices training/cased/accurate-s0/model-best
    OMP_NUM_THREADS=1 python -m benchmarks.precision_choices MODEL --choice fp32 --choice "bf16 encoder (shipped)"

Choices: int8 dynamic quantization of several sets of linear layers (per-tensor and
per-channel weights), and bf16 (the whole encoder converted, or autocast around it).
Results are merged into ``--output`` by choice, so a few choices can be re-run alone.
The int8 rule that wins (mean of the two dev columns) is what
``spacy_agban.int8.keeps_fp32`` keeps in fp32; the test split is scored only for the
shipped choices (``benchmarks/precision_quality.py``).
"""
import os
from pathlib import Path
from typing import Any, Callable, Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import srsly  # noqa: E402
import typer  # noqa: E402

from .paths import ROOT, relative  # noqa: E402

Keep = Callable[[str], bool]  # which linear layers stay fp32, by module name

# int8: name of a choice -> which linear layers stay fp32
INT8_LAYERS: Dict[str, Keep] = {
    "all layers": lambda n: False,
    "all but the FFN output": lambda n: n.endswith("output.dense") and "attention" not in n,
    "the FFN intermediate only": lambda n: "intermediate" not in n,
    "all but the last 2 layers": lambda n: "layer.4." in n or "layer.5." in n,
    "all but every output projection": lambda n: n.endswith("output.dense"),
    "all but the FFN output, query and key (shipped)": lambda n: (
        (n.endswith("output.dense") and "attention" not in n) or n.endswith((".query", ".key"))),
}
PER_CHANNEL = ("all layers", "all but the FFN output", "all but the FFN output, query and key (shipped)")


def int8(keep: Keep, per_channel: bool) -> Callable[[Any], None]:
    def convert(nlp: Any) -> None:
        import torch
        from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig

        from spacy_agban.inference.precision import encoder_of, transformer_components

        qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
        for pipe in transformer_components(nlp):
            hf = encoder_of(pipe)
            hf.eval()
            spec = {n: qconfig for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear) and not keep(n)}
            torch.ao.quantization.quantize_dynamic(hf, spec, dtype=torch.qint8, inplace=True)

    return convert


def bf16_encoder(nlp: Any) -> None:
    from spacy_agban.inference.precision import to_bf16

    to_bf16(nlp)


def bf16_autocast(nlp: Any) -> None:
    """The encoder's weights stay fp32; matrix products run in bf16 under autocast."""
    import torch

    from spacy_agban.inference.precision import _outputs_to_fp32, encoder_of, transformer_components

    for pipe in transformer_components(nlp):
        hf = encoder_of(pipe)
        forward = hf.forward

        def autocast_forward(*args, _forward=forward, _hf=hf, **kwargs):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                output = _forward(*args, **kwargs)
            return _outputs_to_fp32(_hf, args, output)

        hf.forward = autocast_forward


CHOICES: Dict[str, Callable[[Any], None]] = {
    "fp32": lambda nlp: None,
    **{name: int8(keep, per_channel=False) for name, keep in INT8_LAYERS.items()},
    **{f"{name}, per-channel weights": int8(INT8_LAYERS[name], per_channel=True) for name in PER_CHANNEL},
    "bf16 encoder (shipped)": bf16_encoder,
    "bf16 autocast": bf16_autocast,
}


def main(
    model: Path = typer.Argument(..., help="A trained transformer pipeline (fp32)"),
    data: Path = typer.Argument(ROOT / "corpus" / "dev.spacy"),
    choice: List[str] = typer.Option([], help="A choice's name (repeat; default: all)"),
    output: Path = typer.Option(ROOT / "metrics" / "precision_choices.json"),
) -> None:
    import spacy
    import torch

    from spacy_agban.training.evaluation import evaluate_both

    names = list(choice) or list(CHOICES)
    unknown = [n for n in names if n not in CHOICES]
    if unknown:
        raise typer.BadParameter(f"unknown choices {unknown}; known: {list(CHOICES)}")
    torch.set_num_threads(1)
    previous = srsly.read_json(output) if output.exists() else {}
    results: Dict[str, Dict[str, float]] = dict(previous.get("f1", {}))
    for name in names:
        nlp = spacy.load(model)
        CHOICES[name](nlp)
        scores = {k: round(100 * v["ents_f"], 2) for k, v in evaluate_both(nlp, data, 64).items()}
        results[name] = {**scores, "mean": round(sum(scores.values()) / len(scores), 2)}
        typer.echo(f"{name}: {results[name]}")
        srsly.write_json(output, {**previous, "model": relative(model), "data": relative(data), "f1": results})


if __name__ == "__main__":
    typer.run(main)
