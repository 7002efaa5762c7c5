"""Training memory: RSS against the training step, for whole trainings side by side
(``trainings``) or one factor at a time in a short probe (``probe``).

    python -m benchmarks.memory trainings --run concat="concat --output training/mem/concat" \
        --run text="bilstm_crf --output training/mem/text" --out metrics/train_memory.json
    OMP_NUM_THREADS=1 python -m benchmarks.memory probe --config concat \
        --steps 1500 --mode train --label baseline --out metrics/memory_probe.json

``trainings``: each ``--run NAME="ARGS"`` is ``python -m spacy_agban train ARGS`` (a model
name or a .cfg path, then spaCy's options) with its own JSONL log (the step comes from the
last line spaCy's logger wrote) and ``OMP_NUM_THREADS=1``. Every ``--every`` seconds it
samples the resident memory of each training process and its children. The runs start
together, so they share the machine the same way (these machines are noisy: compare runs
within one call, not across calls).

``probe`` builds the pipeline from the config (``init_nlp``) and calls ``nlp.update`` on
shuffled batches of 10 real training examples, like ``spacy train`` (without its evaluation
unless ``--eval-every``). Every ``--every`` steps it records RSS (``/proc/self/statm``) and
glibc's ``mallinfo2``: ``in_use_mb`` (bytes handed out by malloc, i.e. live objects) against
``heap_free_mb`` (freed bytes the heap keeps). Live-object growth shows in ``in_use_mb``;
allocator fragmentation shows in ``heap_free_mb`` with flat ``in_use_mb``. Factors:
``--mode`` featurize | forward | train, ``--stock-shim`` (thinc's own ``PyTorchShim``/
spacy-transformers' ``HFShim``, whose optimizer step leaks, instead of
``spacy_agban.layers.shim``'s in-place twins, for agban and for the transformer),
``--count-tensors``, ``--no-mkldnn``, ``--trim-every`` (``malloc_trim(0)`` calls),
``--gc-every``, ``--tracemalloc`` (top Python allocation sites added in the second half);
environment variables (``MALLOC_ARENA_MAX``, ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``,
``MALLOC_MMAP_THRESHOLD_``) are set with ``--env NAME=VALUE`` since the C libraries read
them at start: the probe runs in a child process. Results are appended to ``--out`` under
``--label`` (paths relative to the repo).
"""
import ctypes
import gc
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import typer

from ._common import ROOT, without_machine_paths

app = typer.Typer(add_completion=False)


# ----- whole trainings side by side --------------------------------------------------------


def _interruptible() -> None:
    """In the child, before exec: SIGINT back to its default. A job started with ``&``
    from a script ignores SIGINT, and Python keeps an ignored SIGINT ignored. With it, a
    training stopped by hand with ``kill -INT`` ends as on Ctrl+C: spaCy's ``finally``
    saves ``model-last`` (SIGTERM ends it without); ``model-best`` is as written at the best
    evaluation. The log gets no "Saved pipeline" line either way."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def process_rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants, in MB (0 once it has gone)."""
    total = 0
    for child in [pid] + descendants(pid):
        try:
            fields = Path(f"/proc/{child}/statm").read_text().split()
            total += int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass
    return total / 1e6


def descendants(pid: int) -> List[int]:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return []
    result = [int(c) for c in children]
    for child in list(result):
        result += descendants(child)
    return result


STEP_ROW = re.compile(r"^\s*\d+\s+(\d+)\s+\d")  # "  E    #  LOSS ..." rows of spaCy's table


def last_step(jsonl: Path, console_log: Path) -> Optional[int]:
    """The last evaluated step: from the JSONL log, or the console table (spaCy's
    logger buffers its JSONL file, so the console is often ahead)."""
    steps: List[int] = []
    if jsonl.exists():
        for line in jsonl.read_text(errors="replace").splitlines():
            try:
                steps.append(int(json.loads(line)["step"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a line being written
    if console_log.exists():
        for line in console_log.read_text(errors="replace").splitlines():
            match = STEP_ROW.match(line)
            if match:
                steps.append(int(match.group(1)))
    return max(steps) if steps else None


@app.command("trainings")
def trainings(
    run: List[str] = typer.Option(..., help='NAME="spacy train ARGS" (repeat for side by side runs)'),
    out: Path = typer.Option(ROOT / "metrics" / "train_memory.json", help="Samples + summary JSON"),
    every: float = typer.Option(30.0, help="Seconds between samples"),
    logs: Path = typer.Option(ROOT / "training" / "memory", help="Where the logs go"),
) -> None:
    """Run whole trainings side by side; record each one's RSS against its step."""
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs: Dict[str, subprocess.Popen] = {}
    jsonls: Dict[str, Path] = {}
    for item in run:
        name, sep, args = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--run takes NAME=ARGS, got {item!r}")
        jsonls[name] = logs / f"{name}.jsonl"
        jsonls[name].unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "spacy_agban", "train", *shlex.split(args),
               "--training.logger.output_file", str(jsonls[name])]
        log = (logs / f"{name}.log").open("w")
        procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, preexec_fn=_interruptible
        )
    samples: Dict[str, List[Dict[str, float]]] = {name: [] for name in procs}
    start = time.time()
    while any(p.poll() is None for p in procs.values()):
        for name, proc in procs.items():
            if proc.poll() is None:
                samples[name].append({"seconds": round(time.time() - start, 1),
                                      "step": last_step(jsonls[name], logs / f"{name}.log"), "rss_mb": round(process_rss_mb(proc.pid), 1)})
        write(out, samples, procs)
        time.sleep(every)
    # the last sample can predate the last evaluations: the summary reads the logs once more
    final_steps = {name: last_step(jsonls[name], logs / f"{name}.log") for name in procs}
    write(out, samples, procs, final_steps)
    for name, proc in procs.items():
        peak = max((s["rss_mb"] for s in samples[name]), default=0.0)
        typer.echo(f"{name}: exit {proc.returncode}, peak RSS {peak:.0f} MB, last step {final_steps[name]}")


def write(out: Path, samples: Dict[str, List[Dict[str, float]]], procs: Dict[str, subprocess.Popen],
          final_steps: Optional[Dict[str, Optional[int]]] = None) -> None:
    def step_of(name: str, rows: List[Dict[str, float]]) -> Optional[int]:
        if final_steps is not None and final_steps.get(name) is not None:
            return final_steps[name]
        return next((s["step"] for s in reversed(rows) if s["step"] is not None), None)

    summary = {name: {"peak_rss_mb": max((s["rss_mb"] for s in rows), default=0.0),
                      "last_step": step_of(name, rows),
                      "returncode": procs[name].returncode}
               for name, rows in samples.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "samples": samples}, indent=1))


# ----- one factor at a time ------------------------------------------------------------------
ENV_FACTORS = ("MALLOC_ARENA_MAX", "ONEDNN_PRIMITIVE_CACHE_CAPACITY", "MALLOC_MMAP_THRESHOLD_",
               "MALLOC_TRIM_THRESHOLD_", "PYTHONHASHSEED", "OMP_NUM_THREADS")


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        return libc
    except (OSError, AttributeError):
        return None


LIBC = _libc()


def own_rss_mb() -> float:
    fields = Path("/proc/self/statm").read_text().split()
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def sample(step: int, start: float) -> Dict[str, float]:
    row = {"step": step, "seconds": round(time.time() - start, 1), "rss_mb": round(own_rss_mb(), 1)}
    if LIBC is not None:
        info = LIBC.mallinfo2()
        row["in_use_mb"] = round((info.uordblks + info.hblkhd) / 1e6, 1)  # live malloc'd bytes
        row["heap_free_mb"] = round(info.fordblks / 1e6, 1)  # freed, kept by the heap
        row["mmapped_mb"] = round(info.hblkhd / 1e6, 1)
    return row


def slope(rows: List[Dict[str, float]], key: str, skip: int) -> Optional[float]:
    """Least-squares growth of ``key`` in MB per 1000 steps, past the first ``skip`` steps."""
    pts = [(r["step"], r[key]) for r in rows if r["step"] >= skip and key in r]
    if len(pts) < 3:
        return None
    n = len(pts)
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    var = sum((p[0] - mx) ** 2 for p in pts)
    return round(1000 * sum((p[0] - mx) * (p[1] - my) for p in pts) / var, 1) if var else None


@app.command("probe")
def probe(
    config: str = typer.Option("concat", help="A model name (configs/, variants.yml) or a .cfg path"),
    train: Path = typer.Option(ROOT / "corpus" / "train.spacy"),
    dev: Path = typer.Option(ROOT / "corpus" / "dev.spacy"),
    vectors: str = typer.Option(str(ROOT / "vectors" / "glove-6b-50d")),
    steps: int = typer.Option(1500),
    every: int = typer.Option(100),
    batch_size: int = typer.Option(10),
    mode: str = typer.Option("train", help="featurize | forward | train"),
    mkldnn: bool = typer.Option(True, "--mkldnn/--no-mkldnn"),
    trim_every: int = typer.Option(0, help="malloc_trim(0) every N steps from here (0 = never)"),
    stock_shim: bool = typer.Option(False, "--stock-shim",
                                    help="thinc's own PyTorchShim (the leak) instead of ours"),
    gc_every: int = typer.Option(0, help="gc.collect() every N steps (0 = never)"),
    eval_every: int = typer.Option(0, help="nlp.evaluate(dev) every N steps, as spacy train"),
    use_tracemalloc: bool = typer.Option(False, "--tracemalloc"),
    env: List[str] = typer.Option([], help="NAME=VALUE for the child process"),
    label: str = typer.Option("baseline"),
    out: Path = typer.Option(ROOT / "metrics" / "memory_probe.json"),
    max_rss_mb: float = typer.Option(6000.0, help="stop the probe above this RSS"),
    count_tensors: bool = typer.Option(False, "--count-tensors", help="count live torch tensors at each sample"),
    child: bool = typer.Option(False, hidden=True),
) -> None:
    """Train (or only featurize / run forward) for --steps; record RSS and heap against the step."""
    if not child:
        # the C libraries read their settings at start: run the probe in a child
        child_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        for item in env:
            name, _, value = item.partition("=")
            child_env[name] = value
        proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", *sys.argv[1:], "--child"],
                              env=child_env)
        raise typer.Exit(proc.returncode)

    import torch
    import spacy
    from spacy.training.initialize import init_nlp
    from thinc.api import fix_random_seed

    import spacy_agban  # noqa: F401  (registers the component)
    from spacy_agban.training.corpus import VisualContextCorpus
    from spacy_agban.training.variants import load_model_config

    torch.backends.mkldnn.enabled = mkldnn
    cfg = load_model_config(config, ROOT / "configs", overrides={
        "paths.train": str(train), "paths.dev": str(dev), "paths.vectors": vectors,
    }, interpolate=False)
    fix_random_seed(0)
    nlp = init_nlp(cfg)
    pipe = nlp.get_pipe("agban")
    shim_classes = []
    for _, component in nlp.pipeline:  # agban's shim and, with a transformer, its HF shim
        for node in component.model.walk():
            for shim in node.shims:
                if stock_shim:
                    # thinc's own update (PyTorchShim) for every shim, as before spacy_agban.layers.shim
                    stock = next(c for c in type(shim).__mro__ if c.__name__ in ("HFShim", "PyTorchShim"))
                    shim.__class__ = stock
                shim_classes.append(type(shim).__name__)
    shim_class = ",".join(shim_classes)
    from spacy_agban.training.corpus import VisualContextCorpus  # examples keep image and caption
    examples = list(VisualContextCorpus(str(train))(nlp))
    dev_examples = list(VisualContextCorpus(str(dev))(nlp)) if eval_every else []
    optimizer = nlp.create_optimizer()
    rng = random.Random(0)
    order: List = []
    rows = []
    if use_tracemalloc:  # after the set-up: only the training loop is traced
        import tracemalloc
        tracemalloc.start(8)
    start = time.time()
    model = pipe.model
    for step in range(steps + 1):
        if step % every == 0:
            rows.append(sample(step, start))
            if count_tensors:  # live torch tensors: the stock update leaves some per step
                gc.collect()
                rows[-1]["live_tensors"] = sum(
                    1 for obj in gc.get_objects() if type(obj) in (torch.Tensor, torch.nn.Parameter))
            print(json.dumps(rows[-1]), flush=True)
            if rows[-1]["rss_mb"] > max_rss_mb:
                print(f"RSS above {max_rss_mb} MB: stopping", flush=True)
                break
        if step == steps:
            break
        if use_tracemalloc and step == steps // 2:
            import tracemalloc
            halfway = tracemalloc.take_snapshot()
        if len(order) < batch_size:
            order = list(examples)
            rng.shuffle(order)
        batch, order = order[:batch_size], order[batch_size:]
        if mode == "train":
            nlp.update(batch, drop=0.5, sgd=optimizer)
        elif mode in ("forward", "featurize"):
            docs = [eg.predicted for eg in batch]
            inputs = (docs, pipe.visual_units(docs), [pipe._gold_tags(eg) for eg in batch])
            if mode == "featurize":
                model.attrs["featurizer"](*inputs)
            else:
                output, _ = model.begin_update(inputs)
                float(output.crf_loss.detach())
                del output, _
        else:
            raise typer.BadParameter(f"unknown mode {mode!r}")
        if trim_every and LIBC is not None and (step + 1) % trim_every == 0:
            LIBC.malloc_trim(0)
        if gc_every and (step + 1) % gc_every == 0:
            gc.collect()
        if eval_every and (step + 1) % eval_every == 0:
            nlp.evaluate(dev_examples)
    top = []
    if use_tracemalloc:
        import tracemalloc
        snap = tracemalloc.take_snapshot()
        # what the second half of the run added (growth), not what the first half built
        for stat in snap.compare_to(halfway, "traceback")[:8]:
            top.append({"kb_added": round(stat.size_diff / 1e3, 1), "count_added": stat.count_diff,
                        "where": [f"{without_machine_paths(f.filename)}:{f.lineno}" for f in stat.traceback][-4:]})
        top.insert(0, {"python_traced_mb": round(tracemalloc.get_traced_memory()[0] / 1e6, 1)})
    skip = min(300, steps // 3)
    result = {
        "config": config, "mode": mode, "steps": steps, "mkldnn": mkldnn,
        "trim_every": trim_every, "shim": shim_class,
        "gc_every": gc_every, "eval_every": eval_every,
        "env": {k: os.environ[k] for k in ENV_FACTORS if k in os.environ},
        "torch": torch.__version__, "spacy": spacy.__version__,
        "rss_start_mb": rows[0]["rss_mb"], "rss_end_mb": rows[-1]["rss_mb"],
        "rss_max_mb": max(r["rss_mb"] for r in rows),
        "rss_mb_per_1000_steps": slope(rows, "rss_mb", skip),
        "in_use_mb_per_1000_steps": slope(rows, "in_use_mb", skip),
        "heap_free_mb_per_1000_steps": slope(rows, "heap_free_mb", skip),
        "seconds": round(time.time() - start, 1),
        "samples": rows,
    }
    if top:
        result["tracemalloc_top"] = top
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    data = json.loads(out.read_text()) if out.exists() else {}
    data[label] = result
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    app()
