"""Run trainings side by side and record each one's RSS against its training step.

    python -m benchmarks.train_memory --run concat="concat --output training/mem/concat" \
        --run text="bilstm_crf --output training/mem/text" --out metrics/train_memory.json

Each ``--run NAME="ARGS"`` is ``python -m spacy_agban train ARGS`` (a model name or a .cfg path, then spaCy's options) with its own JSONL log (the
step comes from the last line spaCy's logger wrote) and ``OMP_NUM_THREADS=1``. Every
``--every`` seconds the script samples the resident memory of each training process
and its children. The runs start together, so they share the machine the same way
(these machines are noisy: compare runs within one call, not across calls).
"""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import typer

from .paths import ROOT

app = typer.Typer(add_completion=False)


def _interruptible() -> None:
    """In the child, before exec: SIGINT back to its default. A job started with ``&``
    from a script ignores SIGINT, and Python keeps an ignored SIGINT ignored. With it, a
    training stopped by hand with ``kill -INT`` ends as on Ctrl+C: spaCy's ``finally``
    saves ``model-last`` (SIGTERM ends it without); ``model-best`` is as written at the best
    evaluation. The log gets no "Saved pipeline" line either way."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def rss_mb(pid: int) -> float:
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


@app.command()
def main(
    run: List[str] = typer.Option(..., help='NAME="spacy train ARGS" (repeat for side by side runs)'),
    out: Path = typer.Option(ROOT / "metrics" / "train_memory.json", help="Samples + summary JSON"),
    every: float = typer.Option(30.0, help="Seconds between samples"),
    logs: Path = typer.Option(ROOT / "training" / "memory", help="Where the logs go"),
) -> None:
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
                                      "step": last_step(jsonls[name], logs / f"{name}.log"), "rss_mb": round(rss_mb(proc.pid), 1)})
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


if __name__ == "__main__":
    app()
