"""The front of test F1 against tagging cost: one row per pipeline this project offers (and
each inference precision of the accurate one), as a Markdown table and a plot.

    python -m benchmarks.front --speed metrics/cost_compare_onnx.json     # from the results on record
    OMP_NUM_THREADS=1 python -m benchmarks.front --measure                # time the front's pipelines first

Nothing here is measured anew except, with ``--measure``, the speed: F1 comes from the metrics
JSON the evaluation commands wrote (``FRONT`` below says which file, key and seeds for each
point), cost from a ``benchmarks.speed`` JSON (words/s as a ratio to spaCy's ``ner`` in the
same run), training time from the files that recorded it. A point whose numbers are in no file
reads "not measured" (or "not recorded"): a pipeline's number is never lent to another, even
one of the same architecture. ``--measure`` runs ``benchmarks.speed`` on the front's trained
pipelines (``--model NAME=PATH``) with the precisions the front lists, writing ``--speed``.
"""
import math
import os
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import srsly
import typer

from ._common import ROOT, machine_line, relative, write_report

app = typer.Typer(add_completion=False)

#: F1 (%) with and without visual context, per seed.
SeedScores = Dict[int, Tuple[float, float]]


# ----- where each number comes from ------------------------------------------------------
def _seed_pattern(pattern: str) -> "re.Pattern[str]":
    """``training/seeds/concat-s*`` -> a pattern whose one group is the seed."""
    return re.compile(re.escape(pattern).replace(r"\*", r"(\d+)") + "$")


@dataclass(frozen=True)
class DecodingChoiceF1:
    """A ``benchmarks.decoding_choice`` JSON: the models matching ``models`` (``*`` = the seed)
    on ``data``, at the ``min_confidence`` that ``config`` (a model name) ships with."""
    path: str
    models: str
    config: str
    data: str = "corpus/test.spacy"

    def min_confidence(self) -> float:
        from spacy_agban.training.variants import load_model_config

        config = load_model_config(self.config, ROOT / "configs", interpolate=False)
        return float(config["components"]["agban"]["min_confidence"])

    def read(self, root: Path) -> SeedScores:
        table = _read_json(root / self.path).get(f"min_confidence on {self.data}", {})
        value, pattern = self.min_confidence(), _seed_pattern(self.models)
        scores: SeedScores = {}
        for model, columns in table.items():
            match = pattern.match(model)
            if match is None:
                continue
            row = [_at_value(columns[c], value) for c in ("with_context", "without_context")]
            if None not in row:
                scores[int(match.group(1))] = (100 * row[0], 100 * row[1])
        return scores

    def describe(self) -> str:
        return (f"`{self.path}`, `{self.models}` on `{self.data}` at `min_confidence` "
                f"{self.min_confidence():g} (`{self.config}`'s setting)")


@dataclass(frozen=True)
class CaptionVariantsF1:
    """``python -m spacy_agban evaluate --captions ...`` JSON files, one per seed (``*``):
    ``stored`` is the column with visual context, ``none`` the one without."""
    path: str

    def read(self, root: Path) -> SeedScores:
        pattern, scores = _seed_pattern(self.path), {}
        for file in sorted(root.glob(self.path)):
            match = pattern.match(file.relative_to(root).as_posix())
            data = _read_json(file)
            if match and "stored" in data and "none" in data:
                scores[int(match.group(1))] = (100 * data["stored"]["ents_f"], 100 * data["none"]["ents_f"])
        return scores

    def describe(self) -> str:
        return f"`{self.path}` (`stored` / `none` captions)"


@dataclass(frozen=True)
class PrecisionF1:
    """A ``benchmarks.precision_quality`` JSON: one trained pipeline (seed ``seed``; the file
    does not name it, so its ``fp32`` row is checked against that seed's fp32 point) in
    several precisions."""
    path: str
    precision: str
    seed: int

    def row(self, root: Path, precision: str) -> Optional[Tuple[float, float]]:
        scores = _read_json(root / self.path).get("scores", {}).get(precision)
        if not scores:
            return None
        return 100 * scores["with_context"]["ents_f"], 100 * scores["without_context"]["ents_f"]

    def read(self, root: Path) -> SeedScores:
        row = self.row(root, self.precision)
        return {} if row is None else {self.seed: row}

    def describe(self) -> str:
        return f"`{self.path}`, `{self.precision}` (seed {self.seed})"


F1Source = Union[DecodingChoiceF1, CaptionVariantsF1, PrecisionF1]


@dataclass(frozen=True)
class QualityBenchTime:
    """``train_seconds`` of ``benchmarks.quality`` run records (``*`` = the seed); a run it
    found trained before records none."""
    path: str

    def read(self, root: Path) -> List[float]:
        values = [_read_json(file).get("train_seconds") for file in sorted(root.glob(self.path))]
        return [v / 60 for v in values if v]

    def describe(self) -> str:
        return f"`train_seconds` of `{self.path}`"


@dataclass(frozen=True)
class MemoryBenchTime:
    """``benchmarks.memory trainings`` files: the last sample of each run named ``runs``
    (``*`` = the seed), within one sampling interval of the training's end."""
    path: str
    runs: str
    about: str = ""

    def read(self, root: Path) -> List[float]:
        pattern, minutes = _seed_pattern(self.runs), []
        for file in sorted(root.glob(self.path)):
            for run, samples in _read_json(file).get("samples", {}).items():
                if pattern.match(run) and samples:
                    minutes.append(samples[-1]["seconds"] / 60)
        return minutes

    def describe(self) -> str:
        return f"the last sample of the `{self.runs}` runs in `{self.path}`" + (f" ({self.about})" if self.about else "")


@dataclass(frozen=True)
class LogTime:
    """The ``seconds`` of the last line of training logs (``*`` = the seed): the JSONL of
    ``spacy_agban.ConsoleLogger.v1``, which records the wall time since the training began.
    A log without it (written by spaCy's own logger) counts as not recorded."""
    path: str

    def read(self, root: Path) -> List[float]:
        minutes = []
        for file in sorted(root.glob(self.path)):
            rows = list(srsly.read_jsonl(file))
            if rows and "seconds" in rows[-1]:
                minutes.append(rows[-1]["seconds"] / 60)
        return minutes

    def describe(self) -> str:
        return f"`seconds` of the last line of `{self.path}`"


TimeSource = Union[QualityBenchTime, MemoryBenchTime, LogTime]


@dataclass(frozen=True)
class Point:
    """One point of the front: ``pipeline`` is its name in a speed run (``--model NAME=``),
    ``model`` the trained pipeline ``--measure`` times (fp32 points)."""
    name: str
    what: str
    f1: F1Source
    pipeline: str
    precision: str = "fp32"
    model: str = ""
    training: Optional[TimeSource] = None

    @property
    def speed_key(self) -> str:
        return self.pipeline if self.precision == "fp32" else f"{self.pipeline}-{self.precision}"


_ACCURATE_F1 = CaptionVariantsF1("metrics/captions/accurate-s*-test.json")
_ACCURATE_TIME = MemoryBenchTime(
    "metrics/lr/train_memory_avg_*.json", "accurate_lr3e-5_avg-s*",
    about="the README's `accurate` seeds, same recipe, trained to its patience; the front's seeds, "
          "stopped by hand, were not timed")
_PRECISION_FILE = "metrics/onnx_quality_test.json"
_SMALL_F1 = CaptionVariantsF1("metrics/small/accurate_small-s*-test.json")
_SMALL_TIME = LogTime("metrics/small/accurate_small-s*.train.jsonl")

FRONT: List[Point] = [
    Point("concat", "the default: GloVe 6B 50d + char BiLSTM + caption units",
          DecodingChoiceF1("metrics/confidence/concat.json", "training/seeds/concat-s*", "concat"),
          pipeline="concat", model="training/seeds/concat-s0",
          training=QualityBenchTime("metrics/bench/concat-s*.json")),
    Point("concat_distilled", "concat's architecture trained on accurate's CRF marginals too",
          DecodingChoiceF1("metrics/distill/concat_distilled_test.json", "training/seeds/concat_distilled-s*",
                           "concat_distilled"),
          pipeline="concat_distilled", model="training/seeds/concat_distilled-s0"),
    Point("accurate", "MiniLM-L6 with the caption in its input + caption units + case",
          _ACCURATE_F1, pipeline="accurate", model="training/seeds/accurate-s0", training=_ACCURATE_TIME),
    Point("accurate_small", "accurate's head on MiniLM-L6's first 2 of 6 layers, reading the post only "
          "(the caption as units), taught by accurate's CRF marginals",
          _SMALL_F1, pipeline="accurate_small", model="training/seeds/accurate_small-s0", training=_SMALL_TIME),
    Point("accurate_small onnx-int8", "accurate_small, ONNX Runtime int8 (accurate's fp32-kept layers)",
          PrecisionF1("metrics/small/onnx_quality_test.json", "onnx-int8", seed=0), pipeline="accurate_small",
          precision="onnx-int8", training=_SMALL_TIME),
    Point("accurate int8", "accurate, PyTorch dynamic int8 (dev-chosen layers)",
          PrecisionF1(_PRECISION_FILE, "int8", seed=0), pipeline="accurate", precision="int8",
          training=_ACCURATE_TIME),
    Point("accurate onnx", "accurate, its encoder run by ONNX Runtime (fp32)",
          PrecisionF1(_PRECISION_FILE, "onnx", seed=0), pipeline="accurate", precision="onnx",
          training=_ACCURATE_TIME),
    Point("accurate onnx-int8", "accurate, ONNX Runtime int8 (the same fp32-kept layers)",
          PrecisionF1(_PRECISION_FILE, "onnx-int8", seed=0), pipeline="accurate", precision="onnx-int8",
          training=_ACCURATE_TIME),
]

#: The goal regions shaded in the plot: (class, min F1, min words/s ratio to spaCy ner at batch 64).
GOALS = (("fast class", 72.5, 1.5), ("accurate class", 74.9, 0.30))
NOT_MEASURED, NOT_RECORDED = "not measured", "not recorded"
SVG_SALT = "spacy-agban-front"


def _read_json(path: Path) -> Dict[str, Any]:
    return srsly.read_json(path) if path.exists() else {}


def _at_value(column: Dict[str, Any], value: float) -> Optional[float]:
    """``decoding_choice`` keys its values as text ("0.0", "0.45"): the row at ``value``."""
    for key, scores in column.items():
        if math.isclose(float(key), value):
            return scores["ents_f"]
    return None


# ----- the table -------------------------------------------------------------------------
def summary(values: Sequence[float]) -> Optional[Dict[str, float]]:
    if not values:
        return None
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def speed_entry(speed: Dict[str, Any], point: Point) -> Tuple[Optional[str], Optional[str], Optional[Dict[str, Any]]]:
    """The speed run's key for ``point``, the pipeline's name in that run and its entry: the
    point's own name, or the name the speed bench gives the same pipeline built from its config
    (``default`` is configs/concat.cfg)."""
    from .speed import CONFIGS

    pipelines = speed.get("pipelines", {})
    suffix = "" if point.precision == "fp32" else f"-{point.precision}"
    names = [point.pipeline] + [n for n, c in CONFIGS.items() if c == f"configs/{point.pipeline}.cfg"]
    for name in names:
        if name + suffix in pipelines:
            return name + suffix, name, pipelines[name + suffix]
    return None, None, None


def ratios(speed: Dict[str, Any], entry: Optional[Dict[str, Any]]) -> Dict[str, Optional[float]]:
    """Words/s as a ratio to spaCy's ner in the same run, batched and one post at a time."""
    from .speed import REFERENCE

    reference = speed.get("pipelines", {}).get(REFERENCE)
    if entry is None or reference is None:
        return {"batch": None, "batch1": None}

    def words_per_s(e: Dict[str, Any], mode: str) -> float:
        return e["words"] / e[mode]["seconds"]

    return {"batch": words_per_s(entry, "pipe") / words_per_s(reference, "pipe"),
            "batch1": words_per_s(entry, "batch1") / words_per_s(reference, "batch1")}


def front_rows(points: Sequence[Point], speed: Dict[str, Any], root: Path = ROOT) -> Tuple[List[Dict[str, Any]], List[str]]:
    """Each point's numbers from the files its sources name, and notes on what is missing."""
    rows, notes = [], []
    fp32_seeds = {p.pipeline: p.f1.read(root) for p in points if p.precision == "fp32"}
    for point in points:
        per_seed = point.f1.read(root)
        key, timed, entry = speed_entry(speed, point)
        minutes = point.training.read(root) if point.training else []
        row: Dict[str, Any] = {
            "name": point.name, "what": point.what, "seeds": sorted(per_seed),
            "per_seed": {str(s): {"with_context": w, "without_context": wo} for s, (w, wo) in sorted(per_seed.items())},
            "with_context": summary([w for w, _ in per_seed.values()]),
            "without_context": summary([wo for _, wo in per_seed.values()]),
            "speed_key": key, "speed_model": speed.get("models", {}).get(timed) if timed else None,
            "ratio_to_spacy_ner": ratios(speed, entry),
            "training_minutes": summary(minutes),
            "sources": {"f1": point.f1.describe(),
                        "training": point.training.describe() if point.training else None},
        }
        if not per_seed:
            notes.append(f"{point.name}: no test F1 in {point.f1.describe()}.")
        if key is None:
            notes.append(f"{point.name}: the speed run has no `{point.speed_key}`; time it with `--measure`.")
        if isinstance(point.f1, PrecisionF1) and per_seed:
            file_fp32 = point.f1.row(root, "fp32")
            fp32 = fp32_seeds.get(point.pipeline, {}).get(point.f1.seed)
            if file_fp32 is None or fp32 is None or any(abs(a - b) > 1e-6 for a, b in zip(file_fp32, fp32)):
                notes.append(f"{point.name}: the fp32 row of `{point.f1.path}` is not {point.pipeline} seed "
                             f"{point.f1.seed}'s fp32 F1: the precision row may be of another model.")
        rows.append(row)
    return rows, notes


def build(points: Sequence[Point], speed_path: Path, root: Path = ROOT) -> Dict[str, Any]:
    speed = srsly.read_json(speed_path)
    rows, notes = front_rows(points, speed, root)
    return {"speed": relative(speed_path), "speed_machine": speed.get("machine"),
            "speed_docs": speed.get("docs"), "speed_reps": speed.get("reps"),
            "speed_load_average": speed.get("load_average"), "batch_size": speed.get("batch_size"),
            "goals": [list(g) for g in GOALS],
            "points": rows, "notes": notes}


def _f1(cell: Optional[Dict[str, float]]) -> str:
    if cell is None:
        return NOT_MEASURED
    return f"{cell['mean']:.2f}" if cell["n"] == 1 else f"{cell['mean']:.2f} ± {cell['std']:.2f}"


def _ratio(value: Optional[float]) -> str:
    return NOT_MEASURED if value is None else f"{value:.2f}×" if value >= 0.1 else f"{value:.3f}×"


def _minutes(cell: Optional[Dict[str, float]]) -> str:
    if cell is None:
        return NOT_RECORDED
    runs = f"{cell['n']} run{'s' if cell['n'] > 1 else ''}"
    return f"{cell['mean']:.1f} ({runs})" if cell["n"] == 1 else f"{cell['mean']:.1f} ± {cell['std']:.1f} ({runs})"


def markdown(result: Dict[str, Any]) -> str:
    size = result["batch_size"]
    lines = [
        "# The front: Twitter-2015 test F1 against tagging cost",
        "",
        "Entity F1 (%), mean ± sample std over the seeds present (model-best chosen on dev); \"with visual "
        "context\": the posts as stored, \"without\": image and caption removed. Cost: words/s as a ratio to "
        f"spaCy's `ner` in the same speed run, one thread, batch {size} (`nlp.pipe`) and batch 1 (`nlp(doc)`). "
        "Training: minutes per run on this project's 2-core CPU, one thread, where a file recorded it.",
        "",
        f"| point | seeds | test F1, with visual context | without | words/s ÷ spaCy ner, batch {size} "
        "| batch 1 | training (min) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["points"]:
        seeds = ",".join(str(s) for s in row["seeds"]) or "—"
        r = row["ratio_to_spacy_ner"]
        lines.append(f"| `{row['name']}` | {seeds} | {_f1(row['with_context'])} | {_f1(row['without_context'])} "
                     f"| {_ratio(r['batch'])} | {_ratio(r['batch1'])} | {_minutes(row['training_minutes'])} |")
    info = result.get("speed_machine")
    lines += ["", f"Speed run: `{result['speed']}`, "
              + (f"measured on {machine_line(info)}" if info else "machine not recorded")
              + (f"; {result['speed_docs']} test posts, median of {result['speed_reps']} interleaved repetitions"
                 if result.get("speed_docs") else "")
              + (f", load average {result['speed_load_average'][0]:.1f}" if result.get("speed_load_average") else "")
              + ".", "", "Goals (the shaded regions of the plot): "
              + "; ".join(f"{name} ≥ {f1} F1 at ≥ {ratio}×" for name, f1, ratio in result["goals"]) + ".",
              "", "Points and sources:", ""]
    for row in result["points"]:
        if row["speed_key"] is None:
            cost = "cost not measured"
        elif row["speed_model"] is None:
            cost = f"cost: `{row['speed_key']}` (built from its config, untrained: the weights do not change the speed)"
        else:
            cost = f"cost: `{row['speed_key']}` (`{row['speed_model']}`)"
        training = row["sources"]["training"] or NOT_RECORDED
        lines.append(f"- `{row['name']}`: {row['what']}. F1: {row['sources']['f1']}; {cost}; training: {training}.")
    if result["notes"]:
        lines += ["", "Missing or doubtful:", ""] + [f"- {note}" for note in result["notes"]]
    lines += ["", "Re-measure (the speed run, then this table): `OMP_NUM_THREADS=1 python -m benchmarks.front "
              "--measure`; from a speed run on record: `python -m benchmarks.front --speed FILE`."]
    return "\n".join(lines) + "\n"


# ----- the plot --------------------------------------------------------------------------
def _label_ranks(placed: List[Dict[str, Any]]) -> List[Tuple[Dict[str, Any], int]]:
    """Each point with its rank, by F1, among the points within a factor 1.6 of its cost."""
    def cost(row: Dict[str, Any]) -> float:
        return row["ratio_to_spacy_ner"]["batch"]

    ranks = []
    for row in placed:
        near = [r for r in placed if max(cost(row), cost(r)) / min(cost(row), cost(r)) < 1.6]
        near.sort(key=lambda r: (-r["with_context"]["mean"], r["name"]))
        ranks.append((row, near.index(row)))
    return ranks


def plot(result: Dict[str, Any], path: Path) -> List[str]:
    """F1 against the batched words/s ratio (log scale), filled with visual context, hollow
    without, goal regions shaded; an SVG that is the same bytes for the same result. Returns
    the points left out (no speed or no F1)."""
    from spacy_agban.cli.plots import pyplot

    plt = pyplot()
    placed = [r for r in result["points"] if r["ratio_to_spacy_ner"]["batch"] is not None and r["with_context"]]
    left_out = [r["name"] for r in result["points"] if r not in placed]
    xs = [r["ratio_to_spacy_ner"]["batch"] for r in placed]
    ys = [r[c]["mean"] for r in placed for c in ("with_context", "without_context") if r[c]]
    goal_x, goal_y = [g[2] for g in result["goals"]], [g[1] for g in result["goals"]]
    x_low, x_high = min(xs + goal_x) / 1.6, max(xs + goal_x) * 2.5
    y_low, y_high = min(ys + goal_y) - 0.8, max(ys + goal_y) + 0.6
    with plt.rc_context({"svg.hashsalt": SVG_SALT, "svg.fonttype": "path"}):
        fig, ax = plt.subplots(figsize=(7.5, 5))
        for (name, f1, ratio), colour in zip(result["goals"], ("#3cb44b", "#4363d8")):
            ax.fill_between([ratio, x_high], f1, y_high, color=colour, alpha=0.12, linewidth=0)
            ax.annotate(f"{name}\n≥ {f1} F1, ≥ {ratio}×", (ratio, f1), xytext=(4, 4),
                        textcoords="offset points", fontsize=8, color=colour)
        for i, row in enumerate(placed):
            x = row["ratio_to_spacy_ner"]["batch"]
            with_, without = row["with_context"], row["without_context"]
            ax.errorbar([x], [with_["mean"]], yerr=[with_["std"]], fmt="o", color="#e6194b", capsize=3,
                        label="with visual context" if i == 0 else None)
            if without is not None:  # beside, so the two error bars stay apart
                ax.errorbar([x * 1.04], [without["mean"]], yerr=[without["std"]], fmt="o", mfc="none",
                            color="#e6194b", capsize=3, label="without" if i == 0 else None)
        for row, rank in _label_ranks(placed):  # labels of nearby points stacked, each with a leader
            ax.annotate(row["name"], (row["ratio_to_spacy_ner"]["batch"], row["with_context"]["mean"]),
                        xytext=(14, 12 - 13 * rank), textcoords="offset points", fontsize=8, va="center",
                        arrowprops={"arrowstyle": "-", "color": "grey", "linewidth": 0.5})
        ax.set_xscale("log")
        ax.set_xlim(x_low, x_high)
        ax.set_ylim(y_low, y_high)
        ax.set_xlabel(f"words/s ÷ spaCy ner, batch {result['batch_size']}, one thread (log scale)")
        ax.set_ylabel("Twitter-2015 test F1 (%)")
        title = "F1 against tagging cost"
        if left_out:
            title += f" (not placed, F1 or speed not measured: {', '.join(left_out)})"
        ax.set_title(title, fontsize=9)
        ax.legend(loc="lower left", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="svg", metadata={"Date": None})
        plt.close(fig)
    return left_out


# ----- measuring -------------------------------------------------------------------------
def measure_command(points: Sequence[Point], speed_path: Path) -> List[str]:
    """``benchmarks.speed`` on the front's trained pipelines, in the precisions it lists."""
    models = [f"{p.pipeline}={p.model}" for p in points if p.precision == "fp32" and p.model]
    precisions = sorted({p.precision for p in points if p.precision != "fp32"})
    missing = [m.split("=", 1)[1] for m in models if not (ROOT / m.split("=", 1)[1]).exists()]
    if missing:
        raise typer.BadParameter(f"--measure times the front's trained pipelines; missing: {', '.join(missing)}")
    command = [sys.executable, "-m", "benchmarks.speed", "--pipelines", ""]
    for model in models:
        command += ["--model", model]
    if precisions:
        command += ["--precisions", ",".join(precisions)]
    return command + ["--output", str(speed_path), "--report", str(speed_path.with_suffix(".md"))]


@app.command()
def main(
    speed: Path = typer.Option(ROOT / "metrics" / "cost_compare_front.json",
                               help="A JSON written by benchmarks.speed (with --measure: written first)"),
    measure: bool = typer.Option(False, help="Run benchmarks.speed on the front's pipelines first"),
    output: Path = typer.Option(ROOT / "metrics" / "front.json"),
    report: Optional[Path] = typer.Option(ROOT / "metrics" / "front.md"),
    plot_path: Optional[Path] = typer.Option(ROOT / "docs" / "front.svg", "--plot", help="The SVG figure"),
) -> None:
    """The front's table (and plot) from the metrics on record and a speed run."""
    if measure:
        command = measure_command(FRONT, speed)
        typer.echo(" ".join(command[1:]), err=True)
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        if subprocess.run(command, cwd=ROOT, env=env).returncode != 0:
            raise SystemExit("benchmarks.speed failed; the front was not written")
    if not speed.exists():
        raise typer.BadParameter(f"no speed run at {speed}: pass --measure, or --speed with a benchmarks.speed JSON "
                                 "(e.g. metrics/cost_compare_onnx.json)")
    result = build(FRONT, speed)
    if plot_path is not None:
        result["plot"] = relative(plot_path)
        result["not_in_plot"] = plot(result, plot_path)
    write_report(result, output, report, markdown)


if __name__ == "__main__":
    app()
