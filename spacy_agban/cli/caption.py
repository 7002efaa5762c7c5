"""``python -m spacy_agban caption``: caption the images of a DocBin before training.

A model trained on one captioner's text and fed another's at tagging time sees its
input shift. This command writes the captions of the captioner a pipeline will tag
with (the ``image_captioner`` component, the same code and caption store) into the
training and evaluation data, so that both come from one captioner. Docs that have
a caption keep it unless ``--overwrite``; a doc whose image cannot be read keeps
what it had (and is named).
"""
import time
from pathlib import Path
from typing import Any, Dict, Optional

import typer


def caption_command(
    input_path: Path = typer.Argument(..., metavar="INPUT", help="A .spacy DocBin whose docs have doc._.image"),
    output_path: Path = typer.Argument(..., metavar="OUTPUT", help="The .spacy DocBin to write"),
    model: Optional[str] = typer.Option(None, "--model", help="A Hugging Face image-to-text model name or a folder (default: the --config's, else Salesforce/blip-image-captioning-base)"),
    config: Optional[Path] = typer.Option(None, "--config", help="Take the captioner's settings from the image_captioner block of this config file or saved pipeline"),
    allow_download: bool = typer.Option(False, "--allow-download", help="Download the model if it is not in the Hugging Face cache"),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Folder the DocBin's image paths are relative to"),
    store: Optional[Path] = typer.Option(None, "--store", help="The caption cache (SQLite; default: the config's, else ~/.cache/spacy_agban/captions.sqlite)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Caption docs that already have a caption"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per generate call (default 8)"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Longest caption, in tokens (default 30)"),
    num_beams: Optional[int] = typer.Option(None, "--num-beams", help="Beam search width (default 3)"),
    gpu_id: int = typer.Option(-1, "--gpu-id", help="Run the captioner on this GPU"),
) -> Dict[str, Any]:
    """Caption a DocBin's images with the captioner a pipeline tags with (train as you tag)."""
    problem = caption_argument_problem(input_path, output_path, config, batch_size, max_new_tokens, num_beams)
    if problem:
        typer.echo(f"caption: {problem}", err=True)
        raise typer.Exit(1)
    settings = captioner_settings(config, model=model, allow_download=allow_download, image_root=image_root,
                                  store=store, overwrite=overwrite, batch_size=batch_size,
                                  max_new_tokens=max_new_tokens, num_beams=num_beams, gpu_id=gpu_id)
    import spacy
    from spacy.tokens import DocBin

    from ..units.captioner import CaptionModelError

    nlp = spacy.blank("en")
    try:
        captioner = nlp.add_pipe("image_captioner", config=settings)
    except (CaptionModelError, ValueError) as err:
        typer.echo(f"caption: {' '.join(str(err).split())}", err=True)
        raise typer.Exit(1)
    docbin = DocBin(store_user_data=True).from_disk(input_path)
    docs = list(docbin.get_docs(nlp.vocab))
    before = {"generated": captioner.n_generated, "stored": captioner.n_store_hits}
    start = time.perf_counter()
    docs = list(nlp.pipe(docs, batch_size=64))
    seconds = time.perf_counter() - start
    out = DocBin(store_user_data=True)
    for doc in docs:
        out.add(doc)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    out.to_disk(output_path)
    summary = summarize(docs, captioner.n_generated - before["generated"], captioner.n_store_hits - before["stored"],
                        seconds)
    typer.echo(format_caption_summary(summary, settings["model"], output_path))
    return summary


def caption_argument_problem(input_path: Path, output_path: Path, config: Optional[Path],
                             batch_size: Optional[int], max_new_tokens: Optional[int],
                             num_beams: Optional[int]) -> Optional[str]:
    """What is wrong with the arguments (None if nothing), before a model is loaded."""
    for option, value in (("--batch-size", batch_size), ("--max-new-tokens", max_new_tokens),
                          ("--num-beams", num_beams)):
        if value is not None and value < 1:
            return f"{option} must be at least 1, not {value}"
    if not input_path.is_file():
        return f"{input_path} does not exist (a .spacy DocBin)"
    try:
        from spacy.tokens import DocBin

        DocBin(store_user_data=True).from_disk(input_path)
    except Exception as err:  # msgpack, zlib or spaCy errors of a file that is no DocBin
        return f"cannot read {input_path} as a DocBin ({type(err).__name__}: {' '.join(str(err).split())[:200]})"
    if output_path.is_dir():
        return f"OUTPUT {output_path} is a folder: name a .spacy file"
    if output_path.resolve() == input_path.resolve():
        return "OUTPUT must differ from INPUT (the input keeps its captions)"
    if config is not None and captioner_block(config) is None:
        return f"{config} has no image_captioner component (a config file or a saved pipeline folder)"
    return None


def captioner_block(config: Path) -> Optional[Dict[str, Any]]:
    """The settings of the first image_captioner component of a config file or a saved pipeline."""
    from spacy.util import load_config

    path = config / "config.cfg" if config.is_dir() else config
    if not path.is_file():
        return None
    try:
        components = load_config(path, interpolate=False).get("components", {})
    except Exception:
        return None
    for block in components.values():
        if block.get("factory") == "image_captioner":
            return {k: v for k, v in block.items() if k != "factory"}
    return None


def captioner_settings(config: Optional[Path], *, model: Optional[str], allow_download: bool,
                       image_root: Optional[Path], store: Optional[Path], overwrite: bool,
                       batch_size: Optional[int], max_new_tokens: Optional[int], num_beams: Optional[int],
                       gpu_id: int) -> Dict[str, Any]:
    """The component's config: the ``--config``'s block, then the options given."""
    from ..units.captioner import DEFAULT_CAPTION_MODEL

    settings: Dict[str, Any] = dict(captioner_block(config) or {}) if config is not None else {}
    settings["generation"] = dict(settings.get("generation") or {"max_new_tokens": 30, "num_beams": 3})
    settings.setdefault("model", DEFAULT_CAPTION_MODEL)
    changes = {"model": model, "image_root": None if image_root is None else str(image_root.resolve()),
               "store": None if store is None else str(store), "batch_size": batch_size}
    settings.update({k: v for k, v in changes.items() if v is not None})
    for key, value in (("max_new_tokens", max_new_tokens), ("num_beams", num_beams)):
        if value is not None:
            settings["generation"][key] = value
    settings["allow_download"] = allow_download or bool(settings.get("allow_download"))
    settings["overwrite"] = overwrite
    if gpu_id >= 0:
        settings["device"] = f"cuda:{gpu_id}"
    return settings


def summarize(docs: Any, generated: int, stored: int, seconds: float) -> Dict[str, Any]:
    origins: Dict[str, int] = {}
    failures = []
    for doc in docs:
        source = doc._.image_caption_source
        origin = source.get("origin") if isinstance(source, dict) else "none"
        origins[origin] = origins.get(origin, 0) + 1
        if origin == "failed":
            failures.append(f"{doc._.image}: {source.get('reason')}")
    return {"docs": len(docs), "generated": origins.get("generated", 0), "given": origins.get("given", 0),
            "failed": origins.get("failed", 0), "none": origins.get("none", 0), "images_generated": generated,
            "images_from_store": stored, "seconds": seconds,
            "images_per_second": generated / seconds if generated and seconds > 0 else 0.0, "failures": failures}


def format_caption_summary(summary: Dict[str, Any], model: str, output: Path) -> str:
    lines = [
        f"caption: {summary['docs']} docs: {summary['generated']} captioned by {model} "
        f"({summary['images_generated']} images generated, {summary['images_from_store']} read from the caption "
        f"store), {summary['given']} kept their caption, {summary['failed']} failed, {summary['none']} without "
        f"an image; {summary['images_per_second']:.2f} images/s generated, {summary['seconds']:.1f} s in all.",
        f"wrote {output}",
    ]
    if summary["failures"]:
        lines.append("Not captioned (first 10): " + "; ".join(summary["failures"][:10]))
    return "\n".join(lines)
