"""Inference speed side by side in one run, one thread, repetitions interleaved: this
tree's pipelines against spaCy's ``ner`` and, with ``--baseline``, against an earlier commit.

    OMP_NUM_THREADS=1 python -m benchmarks.speed                                  # default, accurate, spaCy ner
    OMP_NUM_THREADS=1 python -m benchmarks.speed --baseline c59f146 --reps 5      # ... and that commit's code
    OMP_NUM_THREADS=1 python -m benchmarks.speed --pipelines "" --model agban=training/agban/model-best
    OMP_NUM_THREADS=1 python -m benchmarks.speed --pipelines accurate --precisions bf16,int8 --no-spacy-ner

Each pipeline runs in a worker process of its own (one torch thread), so each peak RSS is
its own; the parent asks the workers in turn (A B C A B C ...), so a loaded machine slows
all alike. A ``--pipelines`` name is built from its config, seed 0, initialized on the dev
split (the weights do not change the speed, and the same seed gives every revision the same
weights); a ``--model NAME=PATH`` is a trained pipeline, loaded. With ``--baseline`` every one
of them also runs on that commit's ``spacy_agban`` (``git archive`` into a temporary folder,
found first on its worker's path) and the entities of every post are compared (they must be
the same). Per pipeline: ``nlp(doc)`` one post at a time and ``nlp.pipe`` in batches of
``--batch-size``, words/s against spaCy's ``ner`` (``configs/spacy_ner.cfg``, built the
same way); for transformer pipelines, the Hugging Face model's forward alone on the exact
inputs it was given in that pass (recorded by a hook: same batches, same padding) under
``torch.inference_mode``. ``--precisions bf16,int8`` adds this tree's transformer pipelines
converted with ``spacy_agban.inference.precision.set_precision``, timed in the same rounds;
their entities are compared with fp32's (they may differ a little). Every pass starts with
empty per-form caches (the char BiLSTM's).
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import typer

from ._common import (
    ROOT, cold_caches, ignore_installed_entry_points, import_registrations, load_average, machine, machine_line,
    peak_rss_mb, relative, write_report,
)

app = typer.Typer(add_completion=False)
worker_app = typer.Typer(add_completion=False)
CONFIGS = {"default": "configs/concat.cfg", "accurate": "configs/accurate.cfg",
           "spacy_ner": "configs/spacy_ner.cfg"}
REFERENCE = "spacy_ner"


# ----- worker ---------------------------------------------------------------------------
@worker_app.command()
def worker(config: str = typer.Option("", help="A config to build (relative to --root)"),
           model: str = typer.Option("", help="A trained pipeline to load"),
           root: Path = typer.Option(...), docs: int = typer.Option(256),
           batch_size: int = typer.Option(64),
           precision: str = typer.Option("fp32", help="fp32, or bf16 / int8 / onnx / onnx-int8 for a transformer pipeline")) -> None:
    """Build or load one pipeline, then answer ``batch1`` / ``pipe`` / ``ents`` / ``quit``."""
    import spacy
    import torch

    from ._common import build_pipeline, fresh_docs, time_batch1, time_pipe

    torch.set_num_threads(1)
    if Path(spacy_agban_folder()).resolve().parent != root.resolve():  # an earlier revision's package
        ignore_installed_entry_points()
    import_registrations()
    nlp = build_pipeline(config, root) if config else spacy.load(model)
    if precision != "fp32":  # only this tree has it
        from spacy_agban.inference.precision import set_precision

        set_precision(nlp, precision)
    loaded_mb = peak_rss_mb()
    test = fresh_docs(nlp, root / "corpus" / "test.spacy", docs)
    recorded: List[Dict[str, Any]] = []
    hf_model = None
    if "transformer" in nlp.pipe_names:
        hf_model = nlp.get_pipe("transformer").model.layers[0].shims[0]._model

        def record(_module, _args, kwargs):
            recorded.append({k: v.clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)})

        hf_model.register_forward_pre_hook(record, with_kwargs=True)
    last: Dict[str, List] = {}

    def raw() -> Dict[str, Any]:
        inputs = list(recorded)
        start = time.perf_counter()
        with torch.inference_mode():
            for kwargs in inputs:
                hf_model(**kwargs)
        seconds = time.perf_counter() - start
        del recorded[len(inputs):]
        masks = [k["attention_mask"] for k in inputs]
        return {"seconds": seconds, "calls": len(inputs),
                "pieces_real": int(sum(int(m.sum()) for m in masks)),
                "pieces_fed": int(sum(m.numel() for m in masks))}

    time_pipe(nlp, test, batch_size)  # warm-up
    print(json.dumps({"ready": True, "docs": len(test), "words": sum(len(d) for d in test),
                      "rss_loaded_mb": loaded_mb}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            break
        recorded.clear()
        cold_caches(nlp)
        if command in ("batch1", "pipe"):
            seconds, last[command] = time_batch1(nlp, test) if command == "batch1" else time_pipe(nlp, test, batch_size)
            answer: Dict[str, Any] = {"seconds": seconds}
            if hf_model is not None:
                answer["raw"] = raw()
            print(json.dumps(answer), flush=True)
        elif command == "ents":
            print(json.dumps({"rss_peak_mb": peak_rss_mb(), **{
                mode: [[(e.start, e.end, e.label_) for e in d.ents] for d in ds] for mode, ds in last.items()}}),
                flush=True)


def spacy_agban_folder() -> str:
    """The folder of the ``spacy_agban`` this process imports (this tree's, or a baseline's)."""
    import importlib.util

    spec = importlib.util.find_spec("spacy_agban")
    assert spec is not None and spec.origin is not None
    return str(Path(spec.origin).parent)


# ----- parent ---------------------------------------------------------------------------
@dataclass
class Spec:
    """One pipeline to time: its name in the report, what builds it, which code runs it."""
    name: str
    config: str = ""
    model: str = ""
    tree: Path = ROOT
    precision: str = "fp32"

    def args(self) -> List[str]:
        what = ["--config", self.config] if self.config else ["--model", str(Path(self.model).resolve())]
        return [*what, "--precision", self.precision]


class Worker:
    def __init__(self, spec: Spec, docs: int, batch_size: int):
        self.name = spec.name
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   PYTHONPATH=str(spec.tree))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.speed", "worker", *spec.args(), "--root", str(ROOT),
             "--docs", str(docs), "--batch-size", str(batch_size)],
            cwd=spec.tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.info = self._read()

    def _read(self) -> Dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"worker {self.name} ended early (exit {self.proc.wait()})")

    def ask(self, command: str) -> Dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.ask("quit")
        except (RuntimeError, BrokenPipeError, ValueError):
            pass
        self.proc.wait(timeout=60)


def baseline_tree(revision: str) -> Path:
    """``spacy_agban`` of ``revision`` plus this tree's ``benchmarks`` (the worker code)."""
    folder = Path(tempfile.mkdtemp(prefix="agban-baseline-"))
    archive = subprocess.run(["git", "archive", revision, "spacy_agban"], cwd=ROOT,
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    shutil.copytree(ROOT / "benchmarks", folder / "benchmarks")
    return folder


def has_encoder(spec: Spec) -> bool:
    """Whether the pipeline has a transformer component, as its config (or its saved one) lists."""
    from thinc.api import Config

    config = spec.tree / spec.config if spec.config else Path(spec.model) / "config.cfg"
    return config.exists() and "transformer" in Config().from_disk(config, interpolate=False)["nlp"]["pipeline"]


def specs_of(pipelines: str, models: List[str], precisions: List[str], spacy_ner: bool,
             old: Optional[Path]) -> List[Spec]:
    """What to time: each pipeline here (and on the baseline), its lower precisions, spaCy's ner."""
    specs: List[Spec] = []
    chosen = [Spec(n, config=CONFIGS[n]) if n in CONFIGS else None for n in filter(None, pipelines.split(","))]
    if None in chosen:
        raise typer.BadParameter(f"--pipelines takes names from {', '.join(CONFIGS)}, got {pipelines!r}")
    for item in models:
        name, sep, path = item.partition("=")
        if not sep or not name or not Path(path).exists():
            raise typer.BadParameter(f"--model takes NAME=PATH of a trained pipeline, got {item!r}")
        chosen.append(Spec(name, model=path))
    for spec in chosen:
        if old is not None:
            specs.append(Spec(f"{spec.name}@baseline", spec.config, spec.model, tree=old))
        specs.append(spec)
        if precisions and has_encoder(spec):  # set_precision converts the encoder; others have none
            specs += [Spec(f"{spec.name}-{p}", spec.config, spec.model, precision=p) for p in precisions]
    if spacy_ner and REFERENCE not in {s.name for s in specs}:
        specs.append(Spec(REFERENCE, config=CONFIGS[REFERENCE]))
    return specs


@app.command()
def main(
    pipelines: str = typer.Option("default,accurate", help="Built from their configs: " + ", ".join(CONFIGS)),
    model: List[str] = typer.Option([], help="NAME=PATH of a trained pipeline (repeat)"),
    baseline: str = typer.Option("", help="A commit whose spacy_agban runs the same pipelines"),
    spacy_ner: bool = typer.Option(True, help="Also time spaCy's ner (configs/spacy_ner.cfg), the ratios' reference"),
    docs: int = typer.Option(256), reps: int = typer.Option(5),
    batch_size: int = typer.Option(64),
    precisions: str = typer.Option("", help="Also the transformer pipelines in these precisions: bf16, int8, onnx, onnx-int8"),
    output: Path = typer.Option(ROOT / "metrics" / "cost_compare.json"),
    report: Optional[Path] = typer.Option(ROOT / "metrics" / "cost_compare.md"),
) -> None:
    """Time the pipelines side by side; check the baseline's entities agree."""
    chosen_precisions = [p for p in precisions.split(",") if p]
    from spacy_agban.inference.precision import PRECISIONS

    if set(chosen_precisions) - set(PRECISIONS[1:]):
        raise typer.BadParameter(f"--precisions takes {', '.join(PRECISIONS[1:])}, got {precisions!r}")
    old = baseline_tree(baseline) if baseline else None
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True).stdout.strip()
    workers: Dict[str, Worker] = {}
    started = time.perf_counter()
    try:
        for spec in specs_of(pipelines, model, chosen_precisions, spacy_ner, old):
            workers[spec.name] = Worker(spec, docs, batch_size)
        runs: Dict[str, Dict[str, List[Dict[str, Any]]]] = {n: {"batch1": [], "pipe": []} for n in workers}
        for rep in range(reps):
            for mode in ("batch1", "pipe"):
                for name, w in workers.items():
                    runs[name][mode].append(w.ask(mode))
            typer.echo(f"rep {rep + 1}/{reps} done", err=True)
        ents = {name: w.ask("ents") for name, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    result: Dict[str, Any] = {
        "machine": machine(), "baseline": baseline or None, "new": revision, "docs": docs, "reps": reps,
        "batch_size": batch_size, "torch_threads": 1, "load_average": load_average(),
        "models": {name: relative(path) for name, _, path in (m.partition("=") for m in model)},
        "wall_s": time.perf_counter() - started, "pipelines": {},
    }
    for name, modes in runs.items():
        entry: Dict[str, Any] = {"words": workers[name].info["words"],
                                 "rss_loaded_mb": workers[name].info["rss_loaded_mb"],
                                 "rss_peak_mb": ents[name].pop("rss_peak_mb")}
        for mode, answers in modes.items():
            entry[mode] = {"seconds": statistics.median(a["seconds"] for a in answers),
                           "all_seconds": [a["seconds"] for a in answers]}
            if answers and "raw" in answers[0]:
                entry[mode]["raw_encoder_seconds"] = statistics.median(a["raw"]["seconds"] for a in answers)
                entry[mode]["encoder_calls"] = answers[0]["raw"]["calls"]
                entry[mode]["pieces_real"] = answers[0]["raw"]["pieces_real"]
                entry[mode]["pieces_fed"] = answers[0]["raw"]["pieces_fed"]
        result["pipelines"][name] = entry
    result["same_entities"] = {  # the baseline against this tree: must be True
        name.split("@")[0]: ents[name] == ents[name.split("@")[0]] for name in workers if name.endswith("@baseline")
    }
    result["docs_with_fp32_entities"] = {  # lower precision against this tree's fp32
        name: share_same(ents[name]["pipe"], ents[split_precision(name)[0]]["pipe"])
        for name in workers if split_precision(name)[1] != "fp32"
    }
    write_report(result, output, report, markdown)


def split_precision(name: str) -> "tuple[str, str]":
    """``accurate-onnx-int8`` -> (``accurate``, ``onnx-int8``); no suffix: fp32."""
    from spacy_agban.inference.precision import PRECISIONS

    for precision in sorted(PRECISIONS[1:], key=len, reverse=True):
        if name.endswith(f"-{precision}"):
            return name[: -len(precision) - 1], precision
    return name, "fp32"


def share_same(docs: List[Any], reference: List[Any]) -> float:
    return sum(a == b for a, b in zip(docs, reference)) / max(1, len(reference))


def markdown(result: Dict[str, Any]) -> str:
    docs, size = result["docs"], result["batch_size"]
    p = result["pipelines"]
    ref = p.get(REFERENCE)
    against = f"{result['new']} against {result['baseline']}" if result.get("baseline") else result["new"]
    lines = [
        f"# Inference speed: {against} (CPU, one thread)",
        "",
        f"Measured on: {machine_line(result['machine'])}." if "machine" in result else "",
        f"{docs} test posts with captions; median of {result['reps']} interleaved repetitions; "
        f"load average {result['load_average'][0]:.1f} at the end (on a loaded machine read the "
        f"ratios, not the absolute figures). batch 1 = `nlp(doc)` per post; batch {size} = "
        f"`nlp.pipe(batch_size={size})`. Words/s against spaCy's `ner` in the same run.",
        "",
        f"| pipeline | batch 1 docs/s | batch 1 words/s | batch {size} docs/s | words/s | / spaCy ner "
        f"(words/s, batch 1 / {size}) | encoder alone (docs/s, batch 1 / batched) | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in p.items():
        raw = ""
        if "raw_encoder_seconds" in e["pipe"]:
            raw = (f"{docs / e['batch1']['raw_encoder_seconds']:.1f} / "
                   f"{docs / e['pipe']['raw_encoder_seconds']:.1f}")
        ratio = ""
        if ref is not None:  # the same posts: the ratio of words/s is the inverse ratio of seconds
            ratio = (f"{ref['batch1']['seconds'] / e['batch1']['seconds']:.2f}x / "
                     f"{ref['pipe']['seconds'] / e['pipe']['seconds']:.2f}x")
        lines.append(
            f"| {name} | {docs / e['batch1']['seconds']:.1f} | {e['words'] / e['batch1']['seconds']:.0f} | "
            f"{docs / e['pipe']['seconds']:.1f} | {e['words'] / e['pipe']['seconds']:.0f} | {ratio} | {raw} | "
            f"{e.get('rss_peak_mb', 0):.0f} |"
        )
    lines += ["", "Ratios (docs/s):", ""]
    for name in (n.split("@")[0] for n in p if n.endswith("@baseline")):
        new, old = p[name], p[f"{name}@baseline"]
        for mode in ("batch1", "pipe"):
            line = f"- {name} {mode}: new / baseline = {old[mode]['seconds'] / new[mode]['seconds']:.2f}x"
            if "raw_encoder_seconds" in new[mode]:
                line += (f"; new pipeline / raw encoder on its own batches = "
                         f"{new[mode]['raw_encoder_seconds'] / new[mode]['seconds']:.2f} "
                         f"(pieces: {new[mode]['pieces_real']} real of {new[mode]['pieces_fed']} fed "
                         f"in {new[mode]['encoder_calls']} calls; baseline fed "
                         f"{old[mode]['pieces_fed']} in {old[mode]['encoder_calls']}; baseline / its "
                         f"raw encoder = {old[mode]['raw_encoder_seconds'] / old[mode]['seconds']:.2f})")
            lines.append(line)
        lines.append(f"- {name}: same entities as the baseline on every doc: {result['same_entities'][name]}")
    for low, share in result.get("docs_with_fp32_entities", {}).items():
        name, precision = split_precision(low)
        for mode in ("batch1", "pipe"):
            lines.append(f"- {name} {precision} {mode}: / fp32 = "
                         f"{p[name][mode]['seconds'] / p[low][mode]['seconds']:.2f}x")
        lines.append(f"- {name} {precision}: docs with the same entities as fp32: {100 * share:.1f}%")
    lines += ["", f"Whole run: {result['wall_s'] / 60:.1f} min."]
    return "\n".join(line for line in lines if line is not None) + "\n"


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        del sys.argv[1]
        worker_app()
    else:
        app()
