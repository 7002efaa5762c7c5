"""Where each millisecond of agban's inference goes, stage by stage, on one thread.

    OMP_NUM_THREADS=1 python -m benchmarks.stage_profile --docs 256 --reps 3

For each pipeline (the GloVe default ``configs/concat.cfg`` and the transformer with the
caption in its input, ``configs/accurate.cfg``; both initialized on the dev split, since
speed does not depend on the weights) it times

- ``nlp(doc)`` one post at a time (batch 1) and ``nlp.pipe`` in batches of 64,
- split into stages: each stage is a function of the inference path wrapped with a
  timer, and its time is *exclusive* (a stage called inside another is subtracted from
  the outer one); ``other`` is the rest of the call (spaCy's own loop, glue),
- and, for the transformer, its encoder's forward pass alone (the Hugging Face model,
  no spaCy, ``torch.inference_mode``) on the very word-piece batches the pipeline fed
  it: same padding, same thread count. ``encoder share`` = raw encoder seconds /
  pipeline seconds: the part of the pipeline's throughput the encoder allows.

Repetitions are interleaved (pipeline A, B, raw encoder, A, B, ...), the median is
reported. Writes JSON (``--output``) and a Markdown table (``--report``).
"""
import json
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import typer

from ._common import (
    ROOT, build_pipeline, cold_caches, fresh_docs, load_average, machine, machine_line, time_batch1, time_pipe,
    write_report,
)

app = typer.Typer(add_completion=False)
PIPELINES = {"default": "configs/concat.cfg", "accurate": "configs/accurate.cfg"}


class StageTimer:
    """Exclusive seconds per stage: nested stages are subtracted from their caller."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {}
        self.calls: Dict[str, int] = {}
        self._stack: List[List[float]] = []  # [start, seconds of nested stages]
        self.enabled = True

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        frame = [time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            elapsed = time.perf_counter() - frame[0]
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - frame[1]
            self.calls[name] = self.calls.get(name, 0) + 1
            if self._stack:
                self._stack[-1][1] += elapsed

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            with self.stage(name):
                return fn(*args, **kwargs)

        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed


def patch(timer: StageTimer, owner: Any, attr: str, name: str) -> None:
    setattr(owner, attr, timer.wrap(name, getattr(owner, attr)))


def hook_module(timer: StageTimer, module: Any, name: str) -> None:
    """Time a torch module's forward (through its pre/post hooks)."""
    contexts: List[Any] = []

    def pre(*_):
        ctx = timer.stage(name)
        ctx.__enter__()
        contexts.append(ctx)

    def post(*_):
        contexts.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post)


class EncoderRecorder:
    """Keeps the word-piece batches the transformer's encoder is fed."""

    def __init__(self) -> None:
        self.batches: List[Dict[str, Any]] = []
        self.recording = False

    def record(self, kwargs: Dict[str, Any]) -> None:
        if self.recording:
            self.batches.append({k: v.detach().clone().numpy() for k, v in kwargs.items()
                                 if hasattr(v, "detach")})


def instrument(nlp, timer: StageTimer, recorder: Optional[EncoderRecorder]) -> None:
    """Wrap the stages of the inference path of ``nlp`` with ``timer``."""
    import spacy_agban.architectures as arch
    import spacy_agban.layers.featurize as featurize
    import spacy_agban.layers.transformer as trf

    agban = nlp.get_pipe("agban")
    patch(timer, agban, "visual_units", "agban: visual units (caption words)")
    patch(timer, featurize.Featurizer, "__call__", "agban: featurize (ids, vectors, chars)")
    patch(timer, agban, "set_annotations", "agban: set doc.ents")
    wrapper = agban.model.get_ref("torch")
    wrapper.attrs["convert_inputs"] = timer.wrap("agban: numpy -> torch", wrapper.attrs["convert_inputs"])
    module = arch.get_module(agban.model)
    if module.text.chars is not None:
        hook_module(timer, module.text.chars, "agban torch: char BiLSTM")
    hook_module(timer, module.text.lstm, "agban torch: word BiLSTM")
    if module.visual is not None:
        hook_module(timer, module.visual, "agban torch: visual projector")
    if module.fusion is not None:
        hook_module(timer, module.fusion, "agban torch: fusion")
    # decode_scored: emissions, Viterbi and, where asked for, the entities' confidences
    patch(timer, module.output, "decode_scored", "agban torch: emissions + CRF Viterbi")
    hook_module(timer, module, "agban torch: rest of the module")
    if getattr(arch, "_pad", None) is not None:
        patch(timer, arch, "_pad", "agban: pad transformer features")
    if "transformer" not in nlp.pipe_names:
        return
    trf_pipe = nlp.get_pipe("transformer")
    for name in ("tokenize_with_captions", "huggingface_tokenize", "get_alignment_via_offset_mapping",
                 "truncate_oversize_splits"):
        if hasattr(trf, name):
            label = {"get_alignment_via_offset_mapping": "transformer: align pieces to tokens",
                     "truncate_oversize_splits": "transformer: truncate"}.get(name, "transformer: tokenize")
            patch(timer, trf, name, label)
    import spacy_transformers.layers.transformer_model as stock

    patch(timer, stock, "huggingface_tokenize", "transformer: tokenize")
    patch(timer, stock, "get_alignment_via_offset_mapping", "transformer: align pieces to tokens")
    # the Hugging Face model itself (whichever code path calls it): timed by its hooks,
    # and its inputs recorded for the raw-encoder pass
    hf_model = hf_model_of(nlp)
    if recorder is not None:
        hf_model.register_forward_pre_hook(
            lambda _m, _a, kwargs: recorder.record(kwargs), with_kwargs=True)
    hook_module(timer, hf_model, "transformer: encoder forward (HF model)")
    patch(timer, trf_pipe, "set_annotations", "transformer: doc._.trf_data (split per doc)")
    listener = agban.model.get_ref("token_encoder")
    inner = listener.layers[0]
    inner_fn = inner._func
    inner._func = timer.wrap("agban: listener pooling", inner_fn)


def hf_model_of(nlp):
    return nlp.get_pipe("transformer").model.layers[0].shims[0]._model


def time_raw_encoder(hf_model, batches: List[Dict[str, Any]]) -> float:
    """Seconds of the Hugging Face forward alone on ``batches`` (inference mode)."""
    import torch

    tensors = [{k: torch.from_numpy(v) for k, v in b.items()} for b in batches]
    start = time.perf_counter()
    with torch.inference_mode():
        for kwargs in tensors:
            hf_model(**kwargs)
    return time.perf_counter() - start


def profile_mode(nlp, timer, recorder, run: Callable[[], float], reps: int) -> Dict[str, Any]:
    """Total seconds and stage seconds (median over reps) of ``run``; raw encoder if any."""
    totals, stages, raw = [], [], []
    for _ in range(reps):
        cold_caches(nlp)
        timer.reset()
        if recorder is not None:
            recorder.batches = []
            recorder.recording = True
        totals.append(run())
        if recorder is not None:
            recorder.recording = False
            timer.enabled = False  # the raw pass is not a pipeline stage
            raw.append(time_raw_encoder(hf_model_of(nlp), recorder.batches))
            timer.enabled = True
        stages.append(dict(timer.seconds))
    names = sorted({n for s in stages for n in s})
    median = {n: statistics.median(s.get(n, 0.0) for s in stages) for n in names}
    result: Dict[str, Any] = {"seconds": statistics.median(totals), "stages": median}
    result["stages"]["other (spaCy loop, glue)"] = max(0.0, result["seconds"] - sum(median.values()))
    if raw:
        result["raw_encoder_seconds"] = statistics.median(raw)
        pieces = [b["attention_mask"] for b in recorder.batches]
        result["encoder_batches"] = len(pieces)
        result["pieces_real"] = int(sum(p.sum() for p in pieces))
        result["pieces_padded"] = int(sum(p.size for p in pieces))
    return result


@app.command()
def main(
    pipelines: str = typer.Option("default,accurate", help="Names from: " + ", ".join(PIPELINES)),
    docs: int = typer.Option(256, help="First N test posts (with their captions)"),
    reps: int = typer.Option(3),
    batch_size: int = typer.Option(64),
    output: Path = typer.Option(ROOT / "metrics" / "stage_profile.json"),
    report: Optional[Path] = typer.Option(ROOT / "metrics" / "stage_profile.md"),
) -> None:
    """Per-stage profile of batch-1 and batched inference, with the raw encoder."""
    import torch

    torch.set_num_threads(1)
    results: Dict[str, Any] = {"machine": machine(), "torch_threads": torch.get_num_threads(),
                               "docs": docs, "reps": reps, "batch_size": batch_size,
                               "load_average_start": load_average(), "pipelines": {}}
    start = time.perf_counter()
    for name in pipelines.split(","):
        nlp = build_pipeline(PIPELINES[name])
        test = fresh_docs(nlp, ROOT / "corpus" / "test.spacy", docs)
        timer = StageTimer()
        recorder = EncoderRecorder() if "transformer" in nlp.pipe_names else None
        instrument(nlp, timer, recorder)
        time_pipe(nlp, test[:32], batch_size)  # warm-up
        words = sum(len(d) for d in test)
        entry: Dict[str, Any] = {"config": PIPELINES[name], "docs": len(test), "words": words}
        entry["batch1"] = profile_mode(nlp, timer, recorder, lambda: time_batch1(nlp, test)[0], reps)
        entry[f"batch{batch_size}"] = profile_mode(
            nlp, timer, recorder, lambda: time_pipe(nlp, test, batch_size)[0], reps
        )
        results["pipelines"][name] = entry
        typer.echo(f"{name}: {json.dumps({k: v['seconds'] for k, v in entry.items() if isinstance(v, dict)})}")
    results["load_average_end"] = load_average()
    results["wall_s"] = time.perf_counter() - start
    write_report(results, output, report, markdown)


def markdown(results: Dict[str, Any]) -> str:
    lines = [
        "# Per-stage inference profile (CPU, one thread)",
        "",
        f"Measured on: {machine_line(results['machine'])}; torch threads: {results['torch_threads']}; "
        f"load average {results['load_average_start'][0]:.1f} at the start (other processes "
        "shared the cores: compare rows of one run, not runs).",
        f"Test posts: the first {results['docs']} of corpus/test.spacy, with captions; median of "
        f"{results['reps']} repetitions. Milliseconds per post; a stage's time excludes the "
        "stages it calls.",
        "",
    ]
    for name, entry in results["pipelines"].items():
        modes = [k for k in entry if k.startswith("batch")]
        lines += [f"## {name} ({entry['config']})", ""]
        lines.append("| stage | " + " | ".join(f"{m} ms/post" for m in modes) + " | " +
                     " | ".join(f"{m} share" for m in modes) + " |")
        lines.append("|---" * (1 + 2 * len(modes)) + "|")
        names = sorted({s for m in modes for s in entry[m]["stages"]},
                       key=lambda s: -entry[modes[-1]]["stages"].get(s, 0.0))
        n = entry["docs"]
        for stage in names:
            ms = [1000 * entry[m]["stages"].get(stage, 0.0) / n for m in modes]
            share = [entry[m]["stages"].get(stage, 0.0) / entry[m]["seconds"] for m in modes]
            lines.append(f"| {stage} | " + " | ".join(f"{x:.2f}" for x in ms) + " | " +
                         " | ".join(f"{x:.0%}" for x in share) + " |")
        lines.append("| **total** | " + " | ".join(
            f"**{1000 * entry[m]['seconds'] / n:.2f}**" for m in modes) + " | " +
            " | ".join("100%" for _ in modes) + " |")
        lines.append("")
        for m in modes:
            e = entry[m]
            line = f"- {m}: {n / e['seconds']:.1f} docs/s, {entry['words'] / e['seconds']:.0f} words/s"
            if e.get("pieces_padded"):
                line += (
                    f"; raw encoder alone on the same {e['encoder_batches']} word-piece batches: "
                    f"{n / e['raw_encoder_seconds']:.1f} docs/s (pipeline / raw encoder throughput "
                    f"= {e['raw_encoder_seconds'] / e['seconds']:.2f}); word pieces "
                    f"{e['pieces_real']} real of {e['pieces_padded']} fed "
                    f"({1 - e['pieces_real'] / e['pieces_padded']:.0%} padding)"
                )
            lines.append(line)
        lines.append("")
    lines.append(f"Whole run: {results['wall_s'] / 60:.1f} min.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app()
