"""Figures about training and about the shared feature space.

- ``plot-training``: the CRF loss, the adversarial loss and dev F1 over training,
  read from the JSONL log that spaCy's ``ConsoleLogger.v3`` writes (``output_file``),
  or from its console table while a run is still going.
- ``plot-modalities``: t-SNE of the projected token features G_T and visual-unit
  features G_V, coloured by modality, one panel per model: adversarial learning
  (eq. 25) should leave the two modalities harder to tell apart.

matplotlib and scikit-learn (the ``viz`` extra) are imported only when drawing.
"""
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy
import typer
from spacy.language import Language
from spacy.tokens import Doc

from ..training.docs_io import read_fresh_docs

MODALITY_COLOURS = {"text": "#4363d8", "caption": "#f58231", "object": "#3cb44b"}


def pyplot():
    """matplotlib's pyplot on the Agg backend, or one line naming the extra that installs it."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("Plots need matplotlib: pip install spacy-agban[viz]") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----- training curves -------------------------------------------------------------------
@dataclass
class TrainingCurves:
    """One row per evaluation of a spaCy training run."""

    name: str
    steps: List[int] = field(default_factory=list)
    crf_loss: List[float] = field(default_factory=list)
    adversarial_loss: List[Optional[float]] = field(default_factory=list)
    dev_f1: List[Optional[float]] = field(default_factory=list)

    def add(self, step: int, crf: float, adversarial: Optional[float], f1: Optional[float]) -> None:
        self.steps.append(step)
        self.crf_loss.append(crf)
        self.adversarial_loss.append(adversarial)
        self.dev_f1.append(f1)

    def updates(self) -> List[int]:
        """Updates in each eval interval: spaCy sums the losses over the interval, then
        resets them; the first evaluation (step 0) comes after a single update."""
        previous = [-1] + self.steps[:-1]
        return [max(1, step - before) for step, before in zip(self.steps, previous)]

    def per_update(self, losses: List[Optional[float]]) -> List[Tuple[int, float]]:
        """(step, mean loss per update over the interval) where the loss was logged."""
        return [(s, v / n) for s, v, n in zip(self.steps, losses, self.updates()) if v is not None]

    @property
    def has_adversarial(self) -> bool:
        return any(v is not None for v in self.adversarial_loss)


def find_training_log(training_output: Path) -> Path:
    """The log of a run: the path itself, ``<folder>.jsonl`` or ``<folder>/log.jsonl``.

    spaCy's logger writes the JSONL through a buffer that is flushed only when training
    ends, so while a run is going its JSONL is empty: then the console log
    ``<folder>.log`` (the table spaCy prints) is used, if there is one.
    """
    if training_output.is_file():
        return training_output
    candidates = [training_output.parent / f"{training_output.name}.jsonl", training_output / "log.jsonl"]
    for candidate in candidates:
        if candidate.is_file() and candidate.stat().st_size:
            return candidate
    console = training_output.parent / f"{training_output.name}.log"
    if console.is_file():
        return console
    tried = ", ".join(str(c) for c in [training_output] + candidates + [console])
    raise FileNotFoundError(f"No training log found (tried {tried}; an empty JSONL counts as none)")


def read_training_log(path: Path, component: str = "agban", name: Optional[str] = None) -> TrainingCurves:
    """Parse the logger's JSONL (or, for a ``.log`` file, spaCy's console table)."""
    name = name or path.name.rsplit(".", 1)[0]
    if path.suffix == ".log":
        return read_console_log(path, component, name)
    return read_jsonl_log(path, component, name)


def read_jsonl_log(path: Path, component: str, name: str) -> TrainingCurves:
    """Losses ``{component, component_adv}`` and dev ``ents_f`` from the JSONL log.

    The adversarial loss is missing from logs written before the pipe reported it
    (and from spaCy's stock logger, which logs one loss per pipe): it is then None.
    spaCy writes the dev scores under ``scores`` (in percent); ``other_scores`` (0-1)
    is read too. A line that is not valid JSON (a run still writing) is skipped.
    """
    curves = TrainingCurves(name)
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        losses = row.get("losses") or {}
        if component not in losses:
            continue
        adversarial = losses.get(f"{component}_adv")
        curves.add(int(row["step"]), float(losses[component]),
                   None if adversarial is None else float(adversarial), _dev_f1(row))
    return curves


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def read_console_log(path: Path, component: str, name: str) -> TrainingCurves:
    """The table ``E  #  LOSS <COMPONENT> ... ENTS_F ... SCORE`` that spaCy prints."""
    curves = TrainingCurves(name)
    columns: List[str] = []
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = _ANSI.sub("", raw.rsplit("\r", 1)[-1]).strip()
        if line.startswith("E ") and "#" in line:
            columns = re.split(r"\s{2,}", line)
            continue
        values = line.split()
        if not columns or len(values) != len(columns) or not values[0].isdigit():
            continue
        row = dict(zip(columns, values))
        loss = row.get(f"LOSS {component.upper()}")
        if loss is None:
            continue
        adversarial = row.get(f"LOSS {component.upper()}_ADV")
        f1 = row.get("ENTS_F")
        curves.add(int(row["#"]), float(loss), None if adversarial is None else float(adversarial),
                   None if f1 is None else float(f1) / 100.0)
    return curves


def _dev_f1(row: Dict) -> Optional[float]:
    """Dev ents_f as a fraction in [0, 1]."""
    if isinstance(row.get("other_scores"), dict) and "ents_f" in row["other_scores"]:
        return float(row["other_scores"]["ents_f"])
    if isinstance(row.get("scores"), dict) and "ents_f" in row["scores"]:
        return float(row["scores"]["ents_f"]) / 100.0  # ConsoleLogger.v3 writes percent
    return None


def plot_training(runs: Sequence[TrainingCurves], output: Path) -> Path:
    """Three panels (CRF loss, adversarial loss, dev F1) with one line per run."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2), layout="constrained")
    for run in runs:
        axes[0].plot(*zip(*run.per_update(run.crf_loss)), marker=".", label=run.name)
        if run.has_adversarial:
            axes[1].plot(*zip(*run.per_update(run.adversarial_loss)), marker=".", label=run.name)
        f1 = [(s, v) for s, v in zip(run.steps, run.dev_f1) if v is not None]
        if f1:
            axes[2].plot(*zip(*f1), marker=".", label=run.name)
    axes[0].set_title("CRF loss (mean per update, each eval interval)")
    axes[1].set_title("adversarial loss (mean per update, each eval interval)")
    axes[2].set_title("dev F1 (ents_f)")
    missing = [run.name for run in runs if not run.has_adversarial]
    if missing:
        axes[1].text(0.02, 0.02, "not in the log for: " + ", ".join(missing),
                     transform=axes[1].transAxes, ha="left", va="bottom", color="#888", fontsize=8)
    for axis in axes:
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if axis.get_lines():
            axis.legend(fontsize=8)
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output


def plot_training_command(
    training_outputs: List[Path] = typer.Argument(
        ..., help="Training logs (.jsonl) or output folders (<folder>.jsonl or <folder>/log.jsonl); several for one line each"),
    output: Path = typer.Option(Path("training.png"), "--output", "-o", help="The PNG to write"),
    component: str = typer.Option("agban", help="Name of the agban component in the pipeline"),
) -> None:
    """Plot the CRF and adversarial losses and dev F1 over training."""
    runs = []
    for training_output in training_outputs:
        try:
            log = find_training_log(training_output)
        except FileNotFoundError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1)
        name = training_output.name.rsplit(".", 1)[0] if training_output.is_file() else training_output.name
        run = read_training_log(log, component, name=name)
        if log.suffix == ".log":
            typer.echo(f"note: read the console table of {log} (no JSONL yet: spaCy writes it at the end)")
        if not run.steps:
            typer.echo(f"error: {log} has no evaluations with a '{component}' loss yet", err=True)
            raise typer.Exit(1)
        if not run.has_adversarial:
            typer.echo(f"note: {log} has no '{component}_adv' loss: that panel stays empty for it")
        runs.append(run)
    output.parent.mkdir(parents=True, exist_ok=True)
    plot_training(runs, output)
    typer.echo(f"Saved {output}")


# ----- the shared space: t-SNE of G_T and G_V ---------------------------------------------
@dataclass
class Projections:
    """Projected features of the real tokens (G_T) and the real visual units (G_V)."""

    tokens: numpy.ndarray  # (N, d)
    units: numpy.ndarray  # (M, d)
    unit_sources: List[str]  # (M,) "caption" / "object"


def collect_projections(
    nlp: Language, docs: Sequence[Doc], component: str = "agban", batch_size: int = 32
) -> Projections:
    """G_T and G_V of ``docs``, as the model's output gives them.

    Padding is dropped with the token mask (doc lengths) and the model's unit mask,
    whose columns the output names by source.
    """
    from ..architectures import get_module

    pipe = nlp.get_pipe(component)
    module = get_module(pipe.model)
    if module.visual is None:
        raise ValueError(f"'{component}' has no visual projector (fusion='none'): no G_V to plot")
    tokens, units, sources = [], [], []
    docs = [doc for doc in docs if len(doc)]
    for start in range(0, len(docs), batch_size):
        batch = docs[start: start + batch_size]
        out = pipe.model.predict((batch, pipe.visual_units(batch, store=False), None))
        g_t = out.text_features.float().cpu().numpy()
        g_v = out.visual_features.float().cpu().numpy()
        unit_mask = out.unit_mask.cpu().numpy()
        source_of = numpy.asarray(out.unit_sources, dtype=object)
        for row, doc in enumerate(batch):
            tokens.append(g_t[row, : len(doc)])
            units.append(g_v[row][unit_mask[row]])
            sources.extend(source_of[unit_mask[row]])
    width = module.text.width
    return Projections(
        tokens=numpy.concatenate(tokens) if tokens else numpy.zeros((0, width), "float32"),
        units=numpy.concatenate(units) if units else numpy.zeros((0, width), "float32"),
        unit_sources=list(sources),
    )


def subsample(n: int, k: int, rng: numpy.random.Generator) -> numpy.ndarray:
    return numpy.sort(rng.choice(n, size=k, replace=False)) if n > k else numpy.arange(n)


@dataclass
class ModalityMap:
    """2-d t-SNE points of one model's features, with each point's modality."""

    name: str
    points: numpy.ndarray  # (n, 2)
    modality: numpy.ndarray  # (n,) "text" / "caption" / "object"
    probe_accuracy: Optional[float]  # linear probe text-vs-visual, balanced, cross-validated


def modality_map(
    name: str, projections: Projections, max_points: int = 1500, seed: int = 0,
    perplexity: float = 30.0, threads: int = 1,
) -> ModalityMap:
    """t-SNE of (sub-sampled) tokens and units together, in one space.

    ``threads`` caps the OpenMP threads of t-SNE: on a busy machine extra threads
    spin-wait and make it several times slower, not faster.
    """
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    rng = numpy.random.default_rng(seed)
    if len(projections.units) == 0:
        raise ValueError(f"{name}: the corpus gave no visual units (no captions or images?)")
    token_rows = subsample(len(projections.tokens), max_points, rng)
    unit_rows = subsample(len(projections.units), max_points, rng)
    features = numpy.concatenate([projections.tokens[token_rows], projections.units[unit_rows]])
    modality = numpy.asarray(
        ["text"] * len(token_rows) + [projections.unit_sources[i] for i in unit_rows], dtype=object
    )
    is_visual = modality != "text"
    tsne = TSNE(
        n_components=2, perplexity=min(perplexity, (len(features) - 1) / 3), init="pca",
        random_state=seed,
    )
    with threadpool_limits(limits=threads):
        points = tsne.fit_transform(features.astype("float64"))
        accuracy = probe_accuracy(features, is_visual, seed)
    return ModalityMap(name, points, modality, accuracy)


def probe_accuracy(features: numpy.ndarray, is_visual: numpy.ndarray, seed: int = 0) -> Optional[float]:
    """How well a linear classifier tells text from visual features (balanced, 3-fold).

    0.5 = indistinguishable: the state the modality discriminator is fought towards.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    n = int(min(is_visual.sum(), (~is_visual).sum()))
    if n < 6:
        return None
    rng = numpy.random.default_rng(seed)
    rows = numpy.concatenate([
        rng.choice(numpy.flatnonzero(is_visual), n, replace=False),
        rng.choice(numpy.flatnonzero(~is_visual), n, replace=False),
    ])
    scores = cross_val_score(LogisticRegression(max_iter=1000), features[rows], is_visual[rows], cv=3)
    return float(scores.mean())


def plot_modalities(maps: Sequence[ModalityMap], output: Path) -> Path:
    plt = pyplot()
    figure, axes = plt.subplots(1, len(maps), figsize=(6 * len(maps), 5.6), squeeze=False,
                                layout="constrained")
    for axis, m in zip(axes[0], maps):
        for modality, colour in MODALITY_COLOURS.items():
            chosen = m.modality == modality
            if chosen.any():
                label = "tokens (G_T)" if modality == "text" else f"{modality} units (G_V)"
                axis.scatter(m.points[chosen, 0], m.points[chosen, 1], s=6, alpha=0.6,
                             color=colour, label=f"{label}, n={int(chosen.sum())}")
        probe = "" if m.probe_accuracy is None else f"\nlinear probe text vs visual: {m.probe_accuracy:.2f}"
        axis.set_title(f"{m.name}{probe}", fontsize=10)
        axis.set_xticks([])
        axis.set_yticks([])
        axis.legend(fontsize=8, markerscale=2, loc="best")
    figure.suptitle("t-SNE of projected token and visual-unit features")
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output


def model_label(path: Path, nlp: Language, component: str) -> str:
    attrs = nlp.get_pipe(component).model.attrs
    adversarial = "adversarial" if attrs.get("adversarial") else "no adversarial"
    name = path.name if path.name not in ("model-best", "model-last") else f"{path.parent.name}/{path.name}"
    return f"{name} ({attrs.get('fusion')}, {adversarial})"


def plot_modalities_command(
    models: List[Path] = typer.Argument(..., help="Trained pipelines, one panel each"),
    corpus: Path = typer.Argument(..., help="A .spacy file of posts (with captions or images)"),
    output: Path = typer.Option(Path("modalities.png"), "--output", "-o", help="The PNG to write"),
    limit: int = typer.Option(500, help="Posts read from the corpus (0: all)"),
    max_points: int = typer.Option(1500, help="At most this many tokens, and this many units, per panel"),
    perplexity: float = typer.Option(30.0, help="t-SNE perplexity"),
    seed: int = typer.Option(0, help="Random seed (sampling and t-SNE)"),
    threads: int = typer.Option(1, help="CPU threads for t-SNE (more only pays on an idle machine)"),
    component: str = typer.Option("agban", help="Name of the agban component in the pipeline"),
) -> None:
    """t-SNE of the projected token (G_T) and visual-unit (G_V) features, per model."""
    import spacy

    for path in list(models) + [corpus]:
        if not path.exists():
            typer.echo(f"error: {path} does not exist", err=True)
            raise typer.Exit(1)
    maps = []
    for path in models:
        nlp = spacy.load(path)
        try:
            projections = collect_projections(nlp, read_fresh_docs(nlp, corpus, limit), component)
            maps.append(modality_map(model_label(path, nlp, component), projections,
                                     max_points, seed, perplexity, threads))
        except ValueError as err:
            typer.echo(f"error: {path}: {err}", err=True)
            raise typer.Exit(1)
        typer.echo(f"{path}: {len(projections.tokens)} tokens, {len(projections.units)} units")
    output.parent.mkdir(parents=True, exist_ok=True)
    plot_modalities(maps, output)
    typer.echo(f"Saved {output}")
