"""Probe training memory: RSS (and glibc heap stats) against steps, one factor at a time.

    OMP_NUM_THREADS=1 python -m benchmarks.memory_probe --config concat \
        --steps 1500 --mode train --label baseline --out metrics/memory_probe.json

builds the pipeline from the config (``init_nlp``) and calls ``nlp.update`` on shuffled
batches of 10 real training examples, like ``spacy train`` (without its evaluation
unless ``--eval-every``). Every ``--every`` steps it records RSS (``/proc/self/statm``)
and glibc's ``mallinfo2``: ``in_use_mb`` (bytes handed out by malloc, i.e. live objects)
against ``heap_free_mb`` (freed bytes the heap keeps). Live-object growth shows in
``in_use_mb``; allocator fragmentation shows in ``heap_free_mb`` with flat ``in_use_mb``.

Factors: ``--mode`` featurize | forward | train, ``--stock-shim`` (thinc's own
``PyTorchShim``/spacy-transformers' ``HFShim``, whose optimizer step leaks, instead of
``spacy_agban.layers.shim``'s in-place twins, for agban and for the transformer), ``--count-tensors``,
``--no-mkldnn``, ``--trim-every`` (``malloc_trim(0)`` calls), ``--gc-every``,
``--tracemalloc`` (top Python allocation sites added in the second half); environment
variables (``MALLOC_ARENA_MAX``,
``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, ``MALLOC_MMAP_THRESHOLD_``) are set with ``--env
NAME=VALUE`` since the C libraries read them at start: the run goes to a child
process. Results are appended to ``--out`` under ``--label`` (paths relative to the repo).
"""
import ctypes
import gc
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import typer

from .paths import ROOT, without_machine_paths

app = typer.Typer(add_completion=False)
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


def rss_mb() -> float:
    fields = Path("/proc/self/statm").read_text().split()
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def sample(step: int, start: float) -> Dict[str, float]:
    row = {"step": step, "seconds": round(time.time() - start, 1), "rss_mb": round(rss_mb(), 1)}
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


@app.command()
def run(
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
    if not child:
        # the C libraries read their settings at start: run the probe in a child
        child_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        for item in env:
            name, _, value = item.partition("=")
            child_env[name] = value
        proc = subprocess.run([sys.executable, "-m", "benchmarks.memory_probe", *sys.argv[1:], "--child"],
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
