"""Test-split quality over seeds: Table III (rows), Table IV (per type), Table VI (k).

For each (row, seed[, k]) it runs ``spacy train`` on the row's config (a model name:
configs/<row>.cfg or a variant in configs/variants.yml, with its overrides; model-best chosen
on dev by spaCy), then ``spacy evaluate model-best <test>``, and writes one metrics JSON
per run; a run whose JSON exists is skipped, a finished training is not repeated.
Nothing is chosen on the test split: the row shown per type is the best on dev.

    python -m benchmarks.quality --rows bilstm_crf,agban,spacy_ner --seeds 0,1,2
"""
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import srsly
import typer
from thinc.api import Config

from spacy_agban.training.variants import load_model_config, resolve

from ._common import ROOT, machine, machine_line, relative

FINISHED = "Saved pipeline"

app = typer.Typer(add_completion=False)


@dataclass
class Run:
    """One training (or an existing one) and its test evaluation."""

    row: str
    seed: int
    k: Optional[int] = None
    existing: Optional[Path] = None
    overrides: Dict[str, object] = field(default_factory=dict)

    @property
    def name(self) -> str:
        k = f"-k{self.k}" if self.k is not None else ""
        return f"{self.row}{k}-s{self.seed}"

    @property
    def label(self) -> str:
        return self.row if self.k is None else f"{self.row} (k={self.k})"


def split_list(value: str) -> List[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_existing(value: str) -> Run:
    """``training/runs/agban-s0=agban:0`` -> an existing run of row agban, seed 0."""
    path, _, rest = value.partition("=")
    row, _, seed = rest.partition(":")
    if not path or not row or not seed.isdigit():
        raise typer.BadParameter(f"--existing wants PATH=ROW:SEED, got {value!r}")
    return Run(row=row, seed=int(seed), existing=Path(path))


# Rows measured before the configs trained for posts without visual context (the
# paper's training: visual_dropout = 0, cross_view = 0) carry this suffix.
PAPER_SUFFIX = "_paper"


def row_config(row: str, configs: Path = ROOT / "configs") -> Tuple[Path, Dict[str, object]]:
    """The config a row trains with and its overrides: the model name resolved as
    ``python -m spacy_agban train`` and project.yml resolve it (spacy_agban/training/variants.py):
    a variant in configs/variants.yml (``agban`` is the paper's model) or configs/<row>.cfg."""
    try:
        return resolve(row, configs)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err


def config_top_k(row: str, configs: Path = ROOT / "configs") -> Optional[int]:
    """The caption top_k that a row trains with (None without caption units)."""
    try:
        config = load_model_config(row.removesuffix(PAPER_SUFFIX), configs, interpolate=False)
    except ValueError:
        return None
    units = config["components"].get("agban", {}).get("caption_units")
    return int(units.get("top_k", 8)) if units else None


def has_output_file(config_path: Path) -> bool:
    config = Config().from_disk(config_path, interpolate=False)
    return "output_file" in config["training"].get("logger", {})


def training_finished(log: Path, model_best: Path) -> bool:
    return model_best.exists() and log.exists() and FINISHED in log.read_text(errors="replace")


def train(run: Run, config: Path, out_dir: Path, overrides: Dict[str, object]) -> float:
    """``spacy train``; returns its wall-clock seconds (0 if it had finished before)."""
    output, log = out_dir / run.name, out_dir / f"{run.name}.log"
    if training_finished(log, output / "model-best"):
        typer.echo(f"  {run.name}: training finished before, not repeated")
        return 0.0
    cmd = [sys.executable, "-m", "spacy", "train", str(config), "--output", str(output),
           "--system.seed", str(run.seed)]
    if has_output_file(config):  # runs must not share the JSONL log
        jsonl = out_dir / f"{run.name}.jsonl"
        jsonl.unlink(missing_ok=True)  # spaCy's logger will not overwrite an old one
        overrides = {**overrides, "training.logger.output_file": str(jsonl)}
    for key, value in overrides.items():  # JSON, as spaCy parses a CLI override
        cmd += [f"--{key}", value if isinstance(value, str) else srsly.json_dumps(value)]
    typer.echo(f"  {run.name}: {' '.join(cmd[1:])}")
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as handle:
        result = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"spacy train failed for {run.name} (see {log})")
    return seconds


def _evaluate_with(module: str, model: Path, data: Path, output: Path) -> Dict:
    """``python -m <module> evaluate MODEL DATA --output OUTPUT``; the scores it wrote."""
    cmd = [sys.executable, "-m", module, "evaluate", str(model), str(data), "--output", str(output)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{module} evaluate failed for {model}:\n{result.stderr[-2000:]}")
    return srsly.read_json(output)


def evaluate(model: Path, test: Path, output: Path) -> Dict:
    """``spacy evaluate``: the scores with the stored visual context."""
    return _evaluate_with("spacy", model, test, output)


def evaluate_two_ways(model: Path, data: Path, output: Path) -> Dict:
    """Scores with the stored visual context and with it removed (spacy_agban evaluate)."""
    return _evaluate_with("spacy_agban", model, data, output)


def prf(scores: Dict) -> Dict:
    return {key: scores.get(key) for key in ("ents_p", "ents_r", "ents_f")}


def run_one(run: Run, configs: Path, out_dir: Path, metrics_dir: Path, test: Path,
            overrides: Dict[str, object], dev: Path = ROOT / "corpus" / "dev.spacy") -> Path:
    metrics_path = metrics_dir / f"{run.name}.json"
    if metrics_path.exists():
        typer.echo(f"  {run.name}: {metrics_path} exists, skipped")
        return metrics_path
    train_seconds = None
    if run.existing is not None:
        model = run.existing / "model-best"
        log = run.existing.with_name(run.existing.name + ".log")
        if not training_finished(log, model):
            raise typer.BadParameter(
                f"{run.existing} is not a finished training ({log} must end with {FINISHED!r})"
            )
        overrides = {}
    else:
        config, variant = row_config(run.row, configs)
        overrides = {**variant, **overrides}
        if run.k is not None:
            overrides = {**overrides, "components.agban.caption_units.top_k": run.k}
        train_seconds = train(run, config, out_dir, overrides)
        model = out_dir / run.name / "model-best"
    metrics_dir.mkdir(parents=True, exist_ok=True)
    raw = evaluate(model, test, metrics_dir / f"{run.name}.spacy-evaluate.json")
    meta = srsly.read_json(model / "meta.json")
    # most posts come without image or caption: every model is scored both ways
    test_two = evaluate_two_ways(model, test, metrics_dir / f"{run.name}.test-two-ways.json")
    dev_two = evaluate_two_ways(model, dev, metrics_dir / f"{run.name}.dev-two-ways.json")
    record = {
        "row": run.row, "seed": run.seed, "k": run.k, "name": run.name,
        "model": relative(model), "test": relative(test), "overrides": overrides,
        "existing": run.existing is not None, "train_seconds": train_seconds,
        "dev": meta.get("performance", {}),
        "test_scores": {key: raw.get(key) for key in ("ents_p", "ents_r", "ents_f")},
        "test_per_type": raw.get("ents_per_type", {}),
        "test_no_context": prf(test_two["without_context"]),
        "dev_two_ways": {key: prf(value) for key, value in dev_two.items()},
        "machine": machine(),
    }
    srsly.write_json(metrics_path, record)
    typer.echo(f"  {run.name}: test F1 {100 * (raw.get('ents_f') or 0):.2f}, "
               f"without visual context {100 * (test_two['without_context']['ents_f'] or 0):.2f}")
    return metrics_path


# ----- the table --------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> str:
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def group(records: List[Dict]) -> Dict[str, List[Dict]]:
    groups: Dict[str, List[Dict]] = {}
    for rec in sorted(records, key=lambda r: (r["row"], r["k"] if r["k"] is not None else -1, r["seed"])):
        label = rec["row"] if rec["k"] is None else f"{rec['row']} (k={rec['k']})"
        groups.setdefault(label, []).append(rec)
    return groups


def short(value: object) -> str:
    """A long path as its last two parts (the table is for reading; the JSON keeps it whole)."""
    text = str(value)
    parts = Path(text).parts
    return f"…/{'/'.join(parts[-2:])}" if "/" in text and len(text) > 40 and len(parts) > 2 else text


def describe_training(recs: List[Dict]) -> str:
    parts = []
    for rec in recs:
        over = {k: v for k, v in rec["overrides"].items() if "output_file" not in k}
        text = ", ".join(f"{'.'.join(k.split('.')[-2:])}={short(v)}" for k, v in over.items())
        parts.append(f"existing {Path(rec['model']).parent}" if rec["existing"] else text or "config")
    return "; ".join(sorted(set(parts)))


def no_context_f(recs: List[Dict], split: str = "test") -> str:
    """F1 with the visual context removed, over the runs that measured it ("—": none;
    runs from before that column are left out and the seeds that count are named)."""
    if split == "test":
        pairs = [(r["seed"], r.get("test_no_context", {}).get("ents_f")) for r in recs]
    else:
        pairs = [(r["seed"], r.get("dev_two_ways", {}).get("without_context", {}).get("ents_f"))
                 for r in recs]
    measured = [(seed, v) for seed, v in pairs if v is not None]
    if not measured:
        return "—"
    text = mean_std([v for _, v in measured])
    if len(measured) < len(pairs):
        text += f" (seed {','.join(str(seed) for seed, _ in measured)})"
    return text


def quality_table(records: List[Dict]) -> str:
    lines = [
        "| row | seeds | test P | test R | test F1 | test F1, context removed "
        "| dev F1 (model-best) | dev F1, context removed | training |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, recs in group(records).items():
        scores = [r["test_scores"] for r in recs]
        lines.append(
            f"| {label} | {','.join(str(r['seed']) for r in recs)} "
            f"| {mean_std([s['ents_p'] for s in scores])} | {mean_std([s['ents_r'] for s in scores])} "
            f"| {mean_std([s['ents_f'] for s in scores])} | {no_context_f(recs)} "
            f"| {mean_std([r['dev'].get('ents_f', 0.0) for r in recs])} | {no_context_f(recs, 'dev')} "
            f"| {describe_training(recs)} |"
        )
    return "\n".join(lines)


def best_on_dev(records: List[Dict]) -> Optional[str]:
    groups = {label: recs for label, recs in group(records).items() if "(k=" not in label}
    if not groups:
        return None
    return max(groups, key=lambda g: statistics.mean(r["dev"].get("ents_f", 0.0) for r in groups[g]))


def per_type_table(recs: List[Dict]) -> str:
    types = sorted({t for r in recs for t in r["test_per_type"]})
    lines = ["| type | P | R | F1 |", "|---|---|---|---|"]
    for t in types:
        rows = [r["test_per_type"].get(t, {"p": 0.0, "r": 0.0, "f": 0.0}) for r in recs]
        lines.append(
            f"| {t} | {mean_std([x['p'] for x in rows])} | {mean_std([x['r'] for x in rows])} "
            f"| {mean_std([x['f'] for x in rows])} |"
        )
    return "\n".join(lines)


def write_report(metrics_dir: Path, report: Path) -> str:
    records = [srsly.read_json(p) for p in sorted(metrics_dir.glob("*.json"))
               if not p.name.endswith(("evaluate.json", "two-ways.json"))]
    records = [r for r in records if isinstance(r, dict) and "row" in r]  # other JSON beside the runs
    if not records:
        raise typer.BadParameter(f"no metrics in {metrics_dir}")
    info = machine()
    parts = [
        "# Quality on the Twitter-2015 test split",
        "",
        f"Written on: {machine_line(info)}.",
        "Each run: `spacy train` (model-best chosen on dev by spaCy), then `spacy evaluate "
        "model-best corpus/test.spacy`, and `python -m spacy_agban evaluate` for the same posts "
        "with their image and caption removed (\"context removed\"; \"—\": the run predates that "
        "column). Scores in %, mean ± sample std over seeds (one value when there is one seed). "
        "Runs trained with overrides (e.g. fewer steps) say so.",
        "",
        "## Rows (Table III)",
        "",
        quality_table([r for r in records if r["k"] is None] or records),
    ]
    best = best_on_dev(records)
    if best is not None:
        parts += [
            "",
            f"## Per type (Table IV): {best}, the best row on dev",
            "",
            per_type_table(group(records)[best]),
        ]
    k_records = [r for r in records if r["k"] is not None]
    if k_records:  # the rows' own runs are the sweep's point at their config's top_k
        swept = {r["row"] for r in k_records}
        k_records += [{**r, "k": config_top_k(r["row"])} for r in records
                      if r["k"] is None and r["row"] in swept and config_top_k(r["row"]) is not None]
        parts += ["", "## Caption units per post (Table VI's shape: top_k)", "",
                  quality_table(k_records)]
    text = "\n".join(parts) + "\n"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text)
    return text


@app.command()
def main(
    rows: str = typer.Option("bilstm_crf,agban,spacy_ner", help="Config names (configs/<row>.cfg or a variant in configs/variants.yml)"),
    seeds: str = typer.Option("0,1,2", help="Seeds, comma-separated"),
    k_values: str = typer.Option("", help="Caption units per post to sweep (rows with caption units), e.g. 0,1,2,4,8"),
    existing: List[str] = typer.Option([], help="PATH=ROW:SEED: evaluate PATH/model-best as that run, without training"),
    max_epochs: Optional[int] = typer.Option(None, help="Override [training] max_epochs"),
    max_steps: Optional[int] = typer.Option(None, help="Override [training] max_steps (smoke tests)"),
    eval_frequency: Optional[int] = typer.Option(None, help="Override [training] eval_frequency"),
    train_limit: Optional[int] = typer.Option(None, help="Use only the first N training docs (smoke tests)"),
    dev_limit: Optional[int] = typer.Option(None, help="Use only the first N dev docs (smoke tests)"),
    set_: List[str] = typer.Option([], "--set", help="KEY=VALUE config override for every training, e.g. paths.transformer=DIR"),
    test: Path = typer.Option(ROOT / "corpus" / "test.spacy", help="Test DocBin (never used for choices)"),
    dev: Path = typer.Option(ROOT / "corpus" / "dev.spacy", help="Dev DocBin (scored both ways for choices)"),
    configs: Path = typer.Option(ROOT / "configs", help="Folder of <row>.cfg and variants.yml"),
    output_dir: Path = typer.Option(ROOT / "training" / "bench", help="Where the trainings go"),
    metrics_dir: Path = typer.Option(ROOT / "metrics" / "bench", help="One JSON per run"),
    report: Path = typer.Option(ROOT / "metrics" / "quality.md", help="The Markdown tables"),
) -> None:
    """Train and evaluate each (row, seed), resumably, and write the quality tables."""
    overrides: Dict[str, object] = {}
    for key, value in (("training.max_epochs", max_epochs), ("training.max_steps", max_steps),
                       ("training.eval_frequency", eval_frequency),
                       ("corpora.train.limit", train_limit), ("corpora.dev.limit", dev_limit)):
        if value is not None:
            overrides[key] = value
    for item in set_:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--set takes KEY=VALUE, got {item!r}")
        overrides[key] = value
    runs = [parse_existing(value) for value in existing]
    taken = {(r.row, r.seed) for r in runs}
    ks = [int(k) for k in split_list(k_values)]
    for row in split_list(rows):
        row_config(row, configs)  # an unknown row stops here, before any training
        for seed in (int(s) for s in split_list(seeds)):
            if (row, seed) not in taken:
                runs.append(Run(row=row, seed=seed))
            if ks and config_top_k(row, configs) is not None:
                runs += [Run(row=row, seed=seed, k=k) for k in ks]
    typer.echo(f"{len(runs)} runs")
    for run in runs:
        run_one(run, configs, output_dir, metrics_dir, test, overrides, dev)
    typer.echo(write_report(metrics_dir, report))


if __name__ == "__main__":
    app()
