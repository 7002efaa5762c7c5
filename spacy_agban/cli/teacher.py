"""``python -m spacy_agban teacher-targets``: a teacher's tag marginals into training data."""
from pathlib import Path
from typing import List

import typer


def teacher_targets_command(
    teacher: str = typer.Argument(..., help="The teacher pipeline (folder or package name), e.g. training/accurate/model-best"),
    data: Path = typer.Argument(..., help="The training DocBin (.spacy) to tag"),
    output: Path = typer.Argument(..., help="Where to write the DocBin with the teacher's marginals"),
    batch_size: int = typer.Option(64, "--batch-size", help="Docs per teacher batch"),
    also: List[str] = typer.Option([], "--also", help="Another teacher (repeat): each doc keeps the mean of all the teachers' marginals"),
) -> None:
    """Tag the training data with a teacher pipeline and store its CRF tag marginals in
    each doc, for training a model with ``distill > 0`` (docs/distillation.md). With
    ``--also``, an ensemble: the mean of several teachers' marginals."""
    import spacy

    from ..training.teacher import write_teacher_targets

    if not data.is_file():
        typer.echo(f"error: {data} is not a file (a .spacy DocBin)", err=True)
        raise typer.Exit(1)
    if output.resolve() == data.resolve():
        typer.echo(f"error: {output} is the input: name another file, the training data is kept as it is", err=True)
        raise typer.Exit(1)
    if batch_size < 1:
        typer.echo(f"error: --batch-size must be >= 1, got {batch_size}", err=True)
        raise typer.Exit(1)
    try:
        counts = write_teacher_targets([teacher, *also], data, output, batch_size=batch_size)
    except (OSError, ValueError) as err:
        typer.echo(f"error: {' '.join(str(err).split())[:300]}", err=True)
        raise typer.Exit(1)
    whose = "the teacher's" if counts["teachers"] == 1 else f"the mean of {counts['teachers']} teachers'"
    typer.echo(f"{counts['with_targets']} of {counts['docs']} docs with {whose} marginals -> {output}")
