"""Inference speed of this tree against an earlier commit, and against spaCy's ``ner``,
side by side in one run, one thread, repetitions interleaved.

    OMP_NUM_THREADS=1 python -m benchmarks.cost_compare --baseline c59f146 --reps 5

Each pipeline runs in a worker process of its own (one torch thread): the pipelines of
``--baseline`` use that commit's ``spacy_agban`` (``git archive`` into a temporary
folder, found first on the worker's path), the others this tree's. Every worker builds
its pipeline from the same config and seed, initialized on the dev split (the weights
do not change the speed, and the same seed gives both trees the same weights), then
answers timing requests; the parent asks them in turn (A B C A B C ...), so a loaded
machine slows all alike. Per pipeline: ``nlp(doc)`` one post at a time and
``nlp.pipe`` in batches of ``--batch-size``; for transformer pipelines, the Hugging
Face model's forward alone on the exact inputs it was given in that pass (recorded by
a hook: same batches, same padding) under ``torch.inference_mode``. The entities of
every doc are compared between the two trees (they must be the same). ``--precisions
bf16,int8`` adds this tree's transformer pipelines converted to those precisions
(``spacy_agban.inference.precision``), timed in the same rounds; their entities are
compared with this tree's fp32 ones (they may differ a little). Every pass
starts with empty per-form caches (the char BiLSTM's): the posts are the same in
every repetition, and a warm cache would time a stream of posts already seen.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import typer

app = typer.Typer(add_completion=False)
worker_app = typer.Typer(add_completion=False)
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"default": "configs/concat.cfg", "accurate": "configs/accurate.cfg",
           "spacy_ner": "configs/spacy_ner.cfg"}


# ----- worker ---------------------------------------------------------------------------
@worker_app.command()
def worker(config: str = typer.Option(...), root: Path = typer.Option(...),
           docs: int = typer.Option(256), batch_size: int = typer.Option(64),
           precision: str = typer.Option("fp32", help="fp32, or bf16 / int8 for a transformer pipeline")) -> None:
    """Build one pipeline, then answer ``batch1`` / ``pipe`` / ``raw`` / ``ents`` / ``quit``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from spacy import util
    from spacy.training.initialize import init_nlp

    import spacy_agban  # noqa: F401
    import spacy_agban.layers.static_vectors  # noqa: F401
    from spacy_agban.training.docs_io import read_fresh_docs

    torch.set_num_threads(1)
    cfg = util.load_config(root / config, overrides={
        "corpora.train.path": str(root / "corpus" / "dev.spacy"),
        "corpora.dev.path": str(root / "corpus" / "dev.spacy"),
        "paths.vectors": str(root / "vectors" / "glove-6b-50d"),
    }, interpolate=False)
    util.fix_random_seed(0)
    nlp = init_nlp(cfg, use_gpu=-1)
    if precision != "fp32":  # only this tree has these
        from spacy_agban.inference.precision import to_bf16
        from spacy_agban.inference.precision import quantize_int8

        {"bf16": to_bf16, "int8": quantize_int8}[precision](nlp)
    test = read_fresh_docs(nlp, root / "corpus" / "test.spacy", docs)
    recorded: List[Dict[str, Any]] = []
    hf_model = None
    if "transformer" in nlp.pipe_names:
        hf_model = nlp.get_pipe("transformer").model.layers[0].shims[0]._model

        def record(_module, _args, kwargs):
            recorded.append({k: v.clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)})

        hf_model.register_forward_pre_hook(record, with_kwargs=True)
    last: Dict[str, List] = {}

    def cold_caches() -> None:
        """Forget the per-form caches of the last pass: each pass starts cold."""
        if "agban" in nlp.pipe_names:
            module = nlp.get_pipe("agban").model.get_ref("torch").shims[0]._model
            for sub in module.modules():
                if hasattr(sub, "clear_cache"):
                    sub.clear_cache()

    def batch1() -> float:
        copies = [d.copy() for d in test]
        start = time.perf_counter()
        for doc in copies:
            nlp(doc)
        seconds = time.perf_counter() - start
        last["batch1"] = copies
        return seconds

    def pipe() -> float:
        copies = [d.copy() for d in test]
        start = time.perf_counter()
        for _ in nlp.pipe(copies, batch_size=batch_size):
            pass
        seconds = time.perf_counter() - start
        last["pipe"] = copies
        return seconds

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

    pipe()  # warm-up
    print(json.dumps({"ready": True, "docs": len(test), "words": sum(len(d) for d in test)}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            break
        recorded.clear()
        cold_caches()
        if command in ("batch1", "pipe"):
            seconds = batch1() if command == "batch1" else pipe()
            answer: Dict[str, Any] = {"seconds": seconds}
            if hf_model is not None:
                answer["raw"] = raw()
            print(json.dumps(answer), flush=True)
        elif command == "ents":
            print(json.dumps({mode: [[(e.start, e.end, e.label_) for e in d.ents] for d in ds]
                              for mode, ds in last.items()}), flush=True)


# ----- parent ---------------------------------------------------------------------------
class Worker:
    def __init__(self, name: str, config: str, cwd: Path, docs: int, batch_size: int, precision: str = "fp32"):
        self.name = name
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        env["PYTHONPATH"] = str(cwd)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.cost_compare", "worker", "--config", config,
             "--root", str(ROOT), "--docs", str(docs), "--batch-size", str(batch_size),
             "--precision", precision],
            cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
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


@app.command()
def main(
    baseline: str = typer.Option("c59f146", help="The commit to compare with"),
    pipelines: str = typer.Option("default,accurate"),
    spacy_ner: bool = typer.Option(True, help="Also time spaCy's ner (configs/spacy_ner.cfg)"),
    docs: int = typer.Option(256), reps: int = typer.Option(5),
    batch_size: int = typer.Option(64),
    precisions: str = typer.Option("", help="Also this tree's transformer pipelines in these precisions: bf16, int8"),
    output: Path = typer.Option(ROOT / "metrics" / "cost_compare.json"),
    report: Optional[Path] = typer.Option(ROOT / "metrics" / "cost_compare.md"),
) -> None:
    """Time baseline and new pipelines side by side; check their entities agree."""
    old = baseline_tree(baseline)
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True).stdout.strip()
    workers: Dict[str, Worker] = {}
    started = time.perf_counter()
    try:
        for name in pipelines.split(","):
            workers[f"{name}@baseline"] = Worker(f"{name}@baseline", CONFIGS[name], old, docs, batch_size)
            workers[f"{name}@new"] = Worker(f"{name}@new", CONFIGS[name], ROOT, docs, batch_size)
            for precision in filter(None, precisions.split(",")):
                if name != "accurate":
                    continue  # only the transformer pipeline has an encoder to convert
                workers[f"{name}@new-{precision}"] = Worker(
                    f"{name}@new-{precision}", CONFIGS[name], ROOT, docs, batch_size, precision)
        if spacy_ner:
            workers["spacy_ner"] = Worker("spacy_ner", CONFIGS["spacy_ner"], ROOT, docs, batch_size)
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
        shutil.rmtree(old, ignore_errors=True)
    result: Dict[str, Any] = {
        "baseline": baseline, "new": revision, "docs": docs, "reps": reps,
        "batch_size": batch_size, "torch_threads": 1, "load_average": os.getloadavg(),
        "wall_s": time.perf_counter() - started, "pipelines": {},
    }
    for name, modes in runs.items():
        entry: Dict[str, Any] = {"words": workers[name].info["words"]}
        for mode, answers in modes.items():
            entry[mode] = {"seconds": statistics.median(a["seconds"] for a in answers),
                           "all_seconds": [a["seconds"] for a in answers]}
            if answers and "raw" in answers[0]:
                entry[mode]["raw_encoder_seconds"] = statistics.median(a["raw"]["seconds"] for a in answers)
                entry[mode]["encoder_calls"] = answers[0]["raw"]["calls"]
                entry[mode]["pieces_real"] = answers[0]["raw"]["pieces_real"]
                entry[mode]["pieces_fed"] = answers[0]["raw"]["pieces_fed"]
        result["pipelines"][name] = entry
    result["same_entities"] = {
        name: ents[f"{name}@baseline"] == ents[f"{name}@new"] for name in pipelines.split(",")
    }
    result["docs_with_fp32_entities"] = {  # lower precision against this tree's fp32
        name: share_same(ents[name]["pipe"], ents[name.split("-")[0]]["pipe"])
        for name in workers if "@new-" in name
    }
    from .paths import write_report

    write_report(result, output, report, markdown)


def share_same(docs: List[Any], reference: List[Any]) -> float:
    return sum(a == b for a, b in zip(docs, reference)) / max(1, len(reference))


def markdown(result: Dict[str, Any]) -> str:
    docs = result["docs"]
    p = result["pipelines"]
    lines = [
        f"# Inference speed: {result['new']} against {result['baseline']} (CPU, one thread)",
        "",
        f"{docs} test posts with captions; median of {result['reps']} interleaved repetitions; "
        f"load average {result['load_average'][0]:.1f} at the end (the machine was loaded: read "
        "the ratios, not the absolute figures). batch 1 = `nlp(doc)` per post; "
        f"batch {result['batch_size']} = `nlp.pipe(batch_size={result['batch_size']})`.",
        "",
        "| pipeline | batch 1 docs/s | batch 1 words/s | batch " + str(result["batch_size"]) +
        " docs/s | words/s | encoder alone (docs/s, batch 1 / batched) |",
        "|---|---|---|---|---|---|",
    ]
    for name, e in p.items():
        raw = ""
        if "raw_encoder_seconds" in e["pipe"]:
            raw = (f"{docs / e['batch1']['raw_encoder_seconds']:.1f} / "
                   f"{docs / e['pipe']['raw_encoder_seconds']:.1f}")
        lines.append(
            f"| {name} | {docs / e['batch1']['seconds']:.1f} | {e['words'] / e['batch1']['seconds']:.0f} | "
            f"{docs / e['pipe']['seconds']:.1f} | {e['words'] / e['pipe']['seconds']:.0f} | {raw} |"
        )
    lines += ["", "Ratios (docs/s):", ""]
    for name in sorted({n.split("@")[0] for n in p if "@" in n}):
        new, old = p[f"{name}@new"], p[f"{name}@baseline"]
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
        lines.append(f"- {name}: same entities as the baseline on every doc: "
                     f"{result['same_entities'][name]}")
        for low in (n for n in p if n.startswith(f"{name}@new-")):
            precision = low.split("-", 1)[1]
            for mode in ("batch1", "pipe"):
                lines.append(f"- {name} {precision} {mode}: / baseline = "
                             f"{old[mode]['seconds'] / p[low][mode]['seconds']:.2f}x, / new fp32 = "
                             f"{new[mode]['seconds'] / p[low][mode]['seconds']:.2f}x")
            share = result.get("docs_with_fp32_entities", {}).get(low)
            if share is not None:
                lines.append(f"- {name} {precision}: docs with the same entities as fp32: {100 * share:.1f}%")
    if "spacy_ner" in p and "default@new" in p:
        ner = p["spacy_ner"]
        for tree in ("new", "baseline"):
            d = p[f"default@{tree}"]
            lines.append(
                f"- default ({tree}) / spaCy ner (words/s): batch 1 "
                f"{ner['batch1']['seconds'] / d['batch1']['seconds']:.2f}x, batch "
                f"{result['batch_size']} {ner['pipe']['seconds'] / d['pipe']['seconds']:.2f}x"
            )
    lines += ["", f"Whole run: {result['wall_s'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        del sys.argv[1]
        worker_app()
    else:
        app()
