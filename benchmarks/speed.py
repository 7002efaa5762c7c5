"""CPU speed and memory of trained pipelines, side by side, in one run.

- inference throughput (words/s, docs/s) on the test split with ``nlp.pipe`` and its
  default batch size, every pipeline loaded in one process and the repetitions
  interleaved (A B C A B C ...), median reported, with the ratio to the reference
  (spaCy's ``ner``);
- inference time against document length (16 ... 1024 tokens) and batch size;
- training time per epoch: a fixed number of ``nlp.update`` steps on the real batches,
  extrapolated to one epoch (dev evaluation not included);
- peak RSS of inference and of training, each measured in its own subprocess.

    python -m benchmarks.speed --model text=training/runs/bilstm_crf-s0/model-best \
        --model agban=training/runs/agban-s0/model-best \
        --model spacy_ner=training/bench/spacy_ner-s0/model-best
"""
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import srsly
import typer

from .machine import machine, machine_line
from .paths import ROOT, relative

DEFAULT_MODELS = [
    "text=training/runs/bilstm_crf-s0/model-best",
    "agban=training/runs/agban-s0/model-best",
    "spacy_ner=training/bench/spacy_ner-s0/model-best",
]
DEFAULT_TRAIN = ["text=bilstm_crf", "default=concat", "spacy_ner=spacy_ner"]
RESULT_PREFIX = "BENCH-RESULT "

app = typer.Typer(add_completion=False)


# ----- helpers that run inside the worker processes --------------------------------------
def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def load(model: str):
    import spacy

    import spacy_agban  # noqa: F401  (factories, readers, the evaluate patch)
    import spacy_agban.layers.static_vectors  # noqa: F401  (the baseline's embedding layer)

    return spacy.load(ROOT / model if not Path(model).is_absolute() else model)


def docs_of_length(docs: Sequence, length: int, n_docs: int) -> list:
    """``n_docs`` docs of exactly ``length`` tokens: running test text, captions kept."""
    from spacy.tokens import Doc

    from spacy_agban.extensions import copy_visual_context

    words = [t.text for d in docs for t in d]
    out = []
    for i in range(n_docs):
        start = (i * length) % max(1, len(words) - length)
        chunk = (words * (1 + length // max(1, len(words)) + 1))[start:start + length]
        doc = Doc(docs[0].vocab, words=chunk)
        copy_visual_context(docs[i % len(docs)], doc)
        out.append(doc)
    return out


def time_pipe(nlp, templates: Sequence, batch_size: Optional[int] = None) -> float:
    docs = [doc.copy() for doc in templates]  # fresh docs: no entities from a previous rep
    start = time.perf_counter()
    for _ in nlp.pipe(docs, batch_size=batch_size):
        pass
    return time.perf_counter() - start


def interleaved(nlps: Dict[str, object], docs: Dict[str, list], reps: int,
                batch_size: Optional[int] = None) -> Dict[str, List[float]]:
    """Seconds per rep for each pipeline, reps interleaved A B C A B C."""
    seconds: Dict[str, List[float]] = {name: [] for name in nlps}
    for name, nlp in nlps.items():  # warm-up: first-call allocations, caches
        time_pipe(nlp, docs[name][:16], batch_size)
    for _ in range(reps):
        for name, nlp in nlps.items():
            seconds[name].append(time_pipe(nlp, docs[name], batch_size))
    return seconds


def emit(result: Dict) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


@app.command("throughput", hidden=True)
def throughput_worker(
    model: List[str] = typer.Option(...), test: Path = typer.Option(...),
    limit: int = typer.Option(0), reps: int = typer.Option(3),
    lengths: str = typer.Option("16,64,256,1024"), batch_sizes: str = typer.Option("1,8,64,256"),
    scaling_tokens: int = typer.Option(4096), scaling_reps: int = typer.Option(3),
) -> None:
    """All pipelines in one process: throughput, then length and batch-size scaling."""
    import torch

    from spacy_agban.training.docs_io import read_fresh_docs

    nlps = {name: load(path) for name, path in (m.split("=", 1) for m in model)}
    docs = {name: read_fresh_docs(nlp, test, limit) for name, nlp in nlps.items()}
    result: Dict[str, object] = {"torch_threads": torch.get_num_threads()}
    seconds = interleaved(nlps, docs, reps)
    result["throughput"] = {
        name: {"seconds": secs, "docs": len(docs[name]), "words": sum(len(d) for d in docs[name]),
               "batch_size": nlps[name].batch_size}
        for name, secs in seconds.items()
    }
    by_length = {}
    for length in (int(v) for v in lengths.split(",")):
        n_docs = max(4, scaling_tokens // length)
        synthetic = {name: docs_of_length(docs[name], length, n_docs) for name in nlps}
        by_length[length] = {"docs": n_docs, "seconds": interleaved(nlps, synthetic, scaling_reps)}
    result["length"] = by_length
    by_batch = {}
    n_docs = max(1, scaling_tokens // 16)  # about the same tokens as each length row
    for size in (int(v) for v in batch_sizes.split(",")):
        subset = {name: d[:n_docs] for name, d in docs.items()}
        by_batch[size] = {
            "docs": len(next(iter(subset.values()))),
            "words": sum(len(d) for d in next(iter(subset.values()))),
            "seconds": interleaved(nlps, subset, scaling_reps, batch_size=size),
        }
    result["batch_size"] = by_batch
    emit(result)


@app.command("infer-memory", hidden=True)
def infer_memory_worker(model: str = typer.Option(...), test: Path = typer.Option(...),
                        limit: int = typer.Option(0)) -> None:
    """Peak RSS of one pipeline: load, then one pass over the test docs."""
    import spacy  # noqa: F401

    before = peak_rss_mb()
    nlp = load(model)
    loaded = peak_rss_mb()
    from spacy_agban.training.docs_io import read_fresh_docs  # after the measured load: nothing new to import

    docs = read_fresh_docs(nlp, test, limit)
    time_pipe(nlp, docs)
    emit({"rss_python_mb": before, "rss_loaded_mb": loaded, "rss_peak_mb": peak_rss_mb()})


@app.command("train-steps", hidden=True)
def train_worker(config: str = typer.Option(..., help="A model name or a .cfg path"), steps: int = typer.Option(30),
                 warmup: int = typer.Option(3), seed: int = typer.Option(0)) -> None:
    """Time ``steps`` updates on real training batches (after ``warmup``), peak RSS."""
    from spacy.schemas import ConfigSchemaTraining
    from spacy.training.initialize import init_nlp
    from spacy.util import registry, resolve_dot_names

    import spacy_agban  # noqa: F401
    import spacy_agban.layers.static_vectors  # noqa: F401

    from spacy_agban.training.variants import load_model_config

    config_obj = load_model_config(config, ROOT / "configs", overrides={"system.seed": seed}, interpolate=False)
    start = time.perf_counter()
    nlp = init_nlp(config_obj, use_gpu=-1)
    init_seconds = time.perf_counter() - start
    T = registry.resolve(nlp.config.interpolate()["training"], schema=ConfigSchemaTraining)
    (train_corpus,) = resolve_dot_names(nlp.config.interpolate(), [T["train_corpus"]])
    examples = list(train_corpus(nlp))
    random.Random(seed).shuffle(examples)
    batches = list(T["batcher"](examples))
    optimizer = T["optimizer"]
    times = []
    for batch in batches[: warmup + steps]:
        tick = time.perf_counter()
        nlp.update(batch, drop=T["dropout"], sgd=optimizer, losses={})
        times.append(time.perf_counter() - tick)
    measured = times[warmup:]
    emit({
        "init_seconds": init_seconds, "train_docs": len(examples), "batches_per_epoch": len(batches),
        "step_seconds": measured, "median_step_seconds": statistics.median(measured),
        "epoch_seconds_extrapolated": statistics.median(measured) * len(batches),
        "rss_peak_mb": peak_rss_mb(),
    })


# ----- the parent: runs the workers, writes the report -----------------------------------
def run_worker(args: List[str], timeout: int) -> Dict:
    cmd = [sys.executable, "-m", "benchmarks.speed", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"worker {' '.join(args[:1])} failed:\n{proc.stderr[-3000:]}")


def named(values: Sequence[str]) -> List[Tuple[str, str]]:
    pairs = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            raise typer.BadParameter(f"expected NAME=PATH, got {value!r}")
        pairs.append((name, path))
    return pairs


def summarize(raw: Dict, reference: str) -> Dict:
    out: Dict[str, Dict] = {"throughput": {}, "length": {}, "batch_size": {}}
    for name, t in raw["throughput"].items():
        median = statistics.median(t["seconds"])
        out["throughput"][name] = {
            "words_per_s": t["words"] / median, "docs_per_s": t["docs"] / median,
            "median_seconds": median, "reps_seconds": t["seconds"], "docs": t["docs"],
            "words": t["words"], "batch_size": t["batch_size"],
        }
    ref = out["throughput"].get(reference)
    for row in out["throughput"].values():
        row["ratio_to_reference"] = row["words_per_s"] / ref["words_per_s"] if ref else None
    for length, entry in raw["length"].items():
        out["length"][length] = {
            name: {"ms_per_doc": 1000 * statistics.median(s) / entry["docs"],
                   "words_per_s": int(length) * entry["docs"] / statistics.median(s)}
            for name, s in entry["seconds"].items()
        }
    for size, entry in raw["batch_size"].items():
        out["batch_size"][size] = {
            name: {"words_per_s": entry["words"] / statistics.median(s),
                   "ms_per_doc": 1000 * statistics.median(s) / entry["docs"]}
            for name, s in entry["seconds"].items()
        }
    return out


def markdown(result: Dict) -> str:
    s, names, ref = result["summary"], list(result["summary"]["throughput"]), result["reference"]
    lines = [
        "# Speed and memory (CPU)", "",
        f"Measured on: {machine_line(result['machine'])}; torch threads in the workers: "
        f"{result['raw_throughput']['torch_threads']}.",
        f"Test docs: {result['test']} (limit {result['limit'] or 'none'}), pre-tokenized "
        "(tokenizer time not included), with their captions. Median of "
        f"{result['reps']} interleaved repetitions; `nlp.pipe` with each pipeline's default "
        "batch size.", "",
        "## Inference throughput", "",
        f"| pipeline | model | words/s | docs/s | ratio to {ref} | RSS after imports / after "
        "load / peak (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        t, mem = s["throughput"][name], result["inference_memory"].get(name, {})
        ratio = f"{t['ratio_to_reference']:.2f}" if t["ratio_to_reference"] else "-"
        rss = " / ".join(f"{mem.get(k, 0):.0f}" for k in ("rss_python_mb", "rss_loaded_mb", "rss_peak_mb"))
        lines.append(f"| {name} | {result['models'][name]} | {t['words_per_s']:.0f} "
                     f"| {t['docs_per_s']:.1f} | {ratio} | {rss} |")
    lines += ["", "## Inference time against document length (ms per doc)", "",
              "| tokens/doc | docs | " + " | ".join(names) + " |",
              "|---|---|" + "---|" * len(names)]
    for length, row in s["length"].items():
        docs = result["raw_throughput"]["length"][length]["docs"]
        lines.append(f"| {length} | {docs} | " + " | ".join(f"{row[n]['ms_per_doc']:.1f}" for n in names) + " |")
    lines += ["", "## Throughput against batch size (words/s)", "",
              "| batch size | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for size, row in s["batch_size"].items():
        lines.append(f"| {size} | " + " | ".join(f"{row[n]['words_per_s']:.0f}" for n in names) + " |")
    if result["training"]:
        lines += ["", "## Training", "",
                  f"{result['train_steps']} `nlp.update` steps on real training batches after "
                  "warm-up steps, median step time multiplied by the batches per epoch "
                  "(extrapolated; dev evaluation not included).", "",
                  "| pipeline | config | s/step | batches/epoch | s/epoch (extrapolated) | peak RSS (MB) |",
                  "|---|---|---|---|---|---|"]
        for name, t in result["training"].items():
            lines.append(f"| {name} | {t['config']} | {t['median_step_seconds']:.3f} "
                         f"| {t['batches_per_epoch']} | {t['epoch_seconds_extrapolated']:.0f} "
                         f"| {t['rss_peak_mb']:.0f} |")
    return "\n".join(lines) + "\n"


@app.command("run")
def main(
    model: List[str] = typer.Option(DEFAULT_MODELS, help="NAME=PATH of a trained pipeline (repeat)"),
    train_config: List[str] = typer.Option(DEFAULT_TRAIN, help="NAME=MODEL to time training for (repeat): a model name (configs/, variants.yml) or a .cfg"),
    reference: str = typer.Option("spacy_ner", help="The pipeline the ratios are taken to"),
    test: Path = typer.Option(ROOT / "corpus" / "test.spacy", help="Test DocBin"),
    limit: int = typer.Option(0, help="Use the first N test docs (0: all)"),
    reps: int = typer.Option(5, help="Interleaved repetitions for the throughput"),
    lengths: str = typer.Option("16,64,256,1024"),
    batch_sizes: str = typer.Option("1,8,64,256"),
    scaling_tokens: int = typer.Option(4096, help="Tokens per length/batch-size measurement"),
    scaling_reps: int = typer.Option(3),
    train_steps: int = typer.Option(30, help="Timed update steps per training config (0: skip)"),
    output: Path = typer.Option(ROOT / "metrics" / "speed.json"),
    report: Path = typer.Option(ROOT / "metrics" / "speed.md"),
    timeout: int = typer.Option(3600, help="Seconds per worker process"),
) -> None:
    """Measure everything and write ``speed.json`` and ``speed.md``."""
    models = dict(named(model))
    missing = [p for p in models.values() if not (ROOT / p).exists() and not Path(p).exists()]
    if missing:
        raise typer.BadParameter(f"no pipeline at {missing}")
    started = time.perf_counter()
    typer.echo("throughput and scaling (one process, interleaved) ...")
    raw = run_worker(["throughput", *sum((["--model", m] for m in model), []), "--test", str(test),
                      "--limit", str(limit), "--reps", str(reps), "--lengths", lengths,
                      "--batch-sizes", batch_sizes, "--scaling-tokens", str(scaling_tokens),
                      "--scaling-reps", str(scaling_reps)], timeout)
    memory = {}
    for name, path in models.items():
        typer.echo(f"inference memory: {name} ...")
        memory[name] = run_worker(["infer-memory", "--model", path, "--test", str(test),
                                   "--limit", str(limit)], timeout)
    training = {}
    if train_steps:
        for name, config in named(train_config):
            typer.echo(f"training steps: {name} ...")
            training[name] = {"config": config, **run_worker(
                ["train-steps", "--config", config, "--steps", str(train_steps)], timeout)}
    result = {
        "machine": machine(), "models": {name: relative(ROOT / path) for name, path in models.items()},
        "reference": reference, "test": relative(test),
        "limit": limit, "reps": reps, "train_steps": train_steps,
        "raw_throughput": raw, "summary": summarize(raw, reference),
        "inference_memory": memory, "training": training,
        "wall_seconds": time.perf_counter() - started,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    srsly.write_json(output, result)
    typer.echo(write_markdown(result, report))


def write_markdown(result: Dict, report: Path) -> str:
    text = markdown(result) + f"\nWhole run: {result['wall_seconds'] / 60:.1f} min.\n"
    report.write_text(text)
    return text


@app.command("report")
def report_command(
    output: Path = typer.Argument(ROOT / "metrics" / "speed.json"),
    report: Path = typer.Option(ROOT / "metrics" / "speed.md"),
) -> None:
    """Write the Markdown report again from a ``speed.json`` (no measuring)."""
    typer.echo(write_markdown(srsly.read_json(output), report))


WORKERS = ("throughput", "infer-memory", "train-steps", "run", "report")

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in WORKERS + ("--help",):
        sys.argv.insert(1, "run")  # `python -m benchmarks.speed [OPTIONS]`
    app()
