"""``python -m spacy_agban package-meta``: the meta.json for ``spacy package``, card filled."""
from pathlib import Path
from typing import Optional

import typer


def package_meta_command(
    model: Path = typer.Argument(..., help="A trained pipeline folder (e.g. training/concat/model-best)"),
    scores: Path = typer.Option(..., help="The JSON `python -m spacy_agban evaluate MODEL DATA --output` wrote"),
    output: Path = typer.Option(..., help="Where to write the meta.json (pass it to spacy package --meta-path)"),
    name: Optional[str] = typer.Option(None, help="Package name (spacy package prefixes the language: en_NAME)"),
    version: Optional[str] = typer.Option(None, help="Package version"),
    evaluated_on: str = typer.Option("the Twitter-2015 test split (3,257 tweets)", help="What the scores were measured on, for the card"),
) -> None:
    """Fill a pipeline's meta.json for `spacy package`: the model card (both score columns,
    the data's terms) and the requirements spaCy cannot detect."""
    import srsly

    from ..training.package import package_meta

    for path, what in ((model / "meta.json", "a pipeline folder with a meta.json"), (scores, "a scores JSON")):
        if not path.is_file():
            typer.echo(f"error: {path} does not exist ({what})", err=True)
            raise typer.Exit(1)
    try:
        meta = package_meta(model, srsly.read_json(scores), name=name, version=version, evaluated_on=evaluated_on)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1)
    output.parent.mkdir(parents=True, exist_ok=True)
    srsly.write_json(output, meta)
    typer.echo(f"{output}: {meta['lang']}_{meta['name']} {meta['version']}, requirements: "
               + ", ".join(meta.get("requirements", [])))
