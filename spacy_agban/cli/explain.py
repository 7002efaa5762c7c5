"""``python -m spacy_agban explain``: what the model looked at, post by post.

For each post it writes a self-contained HTML report (inline CSS, images as base64
data URIs, no network) with the predicted entities (displaCy), the image with the
detected objects drawn on it, the caption units, and the attention map over the
visual units (paper eq. 9) with the gate values (eq. 11-13); and a PNG of the
attention heatmap (matplotlib, Agg backend).

matplotlib is imported only when a figure is drawn, so the CLI starts fast.
"""
import base64
import html
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy
import spacy
import typer
from PIL import Image, ImageDraw, ImageFont
from spacy import displacy
from spacy.language import Language
from spacy.tokens import Doc

from ..colours import ENTITY_COLOURS
from ..training.docs_io import fresh_doc, read_references
from ..units.base import OBJECT

#: The long side of images shown in the report (boxes are scaled along).
REPORT_IMAGE_SIDE = 640
#: Heatmap cells get their value written in them up to this many cells.
MAX_ANNOTATED_CELLS = 400
BOX_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#008080", "#9a6324")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass
class Explanation:
    """One post after the pipeline ran, with what the report shows."""

    name: str
    doc: Doc
    units: List[Dict[str, Any]]
    attention: Optional[numpy.ndarray]  # (tokens, units); None when not recorded
    gate: Optional[numpy.ndarray]  # (tokens,) mean gate value per token, in [0, 1]
    gold: Optional[Doc] = None  # the reference doc, when the post came from a corpus
    image: Optional[Image.Image] = None  # the image with the object boxes drawn
    image_note: Optional[str] = None  # why there is no image, if there is none


# ----- loading ---------------------------------------------------------------------------
def load_pipeline(model: Union[str, Path], component: str = "agban") -> Language:
    """Load a pipeline with the attention of ``component`` and its entities' confidences
    recorded on each doc."""
    settings = {"record_attention": True, "store_confidence": True}
    nlp = spacy.load(model, config={"components": {component: settings}})
    pipe = nlp.get_pipe(component)
    for name, value in settings.items():
        if not getattr(pipe, name, False):  # config override not honoured
            setattr(pipe, name, value)
    return nlp


def use_image_root(nlp: Language, component: str, image_root: Optional[Path]) -> Optional[Path]:
    """The folder relative image paths resolve against, for the model and the report alike:
    ``image_root`` if given (the pipeline's object units then use it too), else the
    pipeline's own (as restored when it was loaded), else None (the current folder)."""
    units = getattr(nlp.get_pipe(component), "object_units", None)
    if image_root is not None:
        if hasattr(units, "use_image_root"):
            units.use_image_root(image_root)
        return image_root.resolve()
    return getattr(getattr(units, "loader", None), "image_root", None)


def read_docs(
    path: Path, nlp: Language, limit: int = 0, image_ids: Sequence[str] = ()
) -> List[Doc]:
    """Reference docs of a ``.spacy`` file, optionally those of some image ids only."""
    wanted = {_strip_jpg(i) for i in image_ids}
    docs = []
    for doc in read_references(nlp, path):
        if wanted and _strip_jpg(str(doc.user_data.get("image_id", ""))) not in wanted:
            continue
        docs.append(doc)
        if limit and len(docs) >= limit:
            break
    return docs


def _strip_jpg(image_id: str) -> str:
    return image_id[:-4] if image_id.lower().endswith(".jpg") else image_id


def post_name(doc: Doc, index: int) -> str:
    image_id = doc.user_data.get("image_id")
    stem = _strip_jpg(str(image_id)) if image_id else "post"
    return f"{index:03d}-{_UNSAFE_NAME.sub('_', stem)}"


# ----- running the pipeline --------------------------------------------------------------
def recorded_attention(
    doc: Doc,
) -> Tuple[List[Dict[str, Any]], Optional[numpy.ndarray], Optional[numpy.ndarray]]:
    """(units, attention (tokens x units), gate (tokens,)) as recorded by the pipe."""
    units = list(doc._.visual_units or [])
    record = doc._.agban_attention
    if record is None:
        return units, None, None
    units = list(record["units"] or [])
    attention = numpy.asarray(record["attention"], dtype="float32").reshape(len(doc), len(units))
    gate = None if record["gate"] is None else numpy.asarray(record["gate"], dtype="float32")
    return units, attention, gate


def explain_docs(
    nlp: Language,
    docs: Iterable[Doc],
    names: Optional[Sequence[str]] = None,
    image_root: Optional[Path] = None,
    batch_size: int = 32,
    with_gold: bool = True,
) -> List[Explanation]:
    """Run the pipeline on fresh copies of ``docs`` (text + image + caption only).

    With ``with_gold``, the given docs are shown as the gold standard (corpus docs).
    """
    references = list(docs)
    inputs = [fresh_doc(nlp, reference) for reference in references]
    results = []
    for i, (reference, doc) in enumerate(zip(references, nlp.pipe(inputs, batch_size=batch_size))):
        units, attention, gate = recorded_attention(doc)
        image, note = draw_post_image(doc._.image, units, image_root)
        results.append(Explanation(
            name=names[i] if names is not None else post_name(reference, i),
            doc=doc, units=units, attention=attention, gate=gate,
            gold=reference if with_gold and reference.has_annotation("ENT_IOB") else None,
            image=image, image_note=note,
        ))
    return results


# ----- the image with its objects --------------------------------------------------------
def draw_post_image(
    ref: Any, units: Sequence[Dict[str, Any]], image_root: Optional[Path] = None,
    max_side: int = REPORT_IMAGE_SIDE,
) -> Tuple[Optional[Image.Image], Optional[str]]:
    """The post's image, downscaled, with the object units' boxes; or (None, why not)."""
    if ref is None:
        return None, None
    from ..detection.images import ImageLoader, ImageLoadError

    loader = ImageLoader(image_root=image_root, allow_remote=False, max_side=max_side)
    try:
        loaded = loader.load(ref)
    except ImageLoadError as err:
        return None, str(err)
    return draw_objects(loaded.image, units, loaded.scale), None


def draw_objects(
    image: Image.Image, units: Sequence[Dict[str, Any]], scale: Tuple[float, float] = (1.0, 1.0)
) -> Image.Image:
    """A copy of ``image`` with each object unit's box (original coordinates) and label."""
    drawn = image.convert("RGB")
    draw = ImageDraw.Draw(drawn)
    font = ImageFont.load_default(size=max(12, round(max(drawn.size) / 45)))
    width = max(2, round(max(drawn.size) / 250))
    for number, unit in object_units_with_boxes(units):
        x1, y1, x2, y2 = unit["box"]
        box = (x1 * scale[0], y1 * scale[1], x2 * scale[0], y2 * scale[1])
        colour = BOX_COLOURS[(number - 1) % len(BOX_COLOURS)]
        draw.rectangle(box, outline=colour, width=width)
        text = f"[{number}] {unit_text(unit)}"
        _, _, text_width, text_height = draw.textbbox((0, 0), text, font=font)
        top = max(0.0, box[1] - text_height - 4)
        draw.rectangle((box[0], top, box[0] + text_width + 4, top + text_height + 4), fill=colour)
        draw.text((box[0] + 2, top + 2), text, fill="white", font=font)
    return drawn


def object_units_with_boxes(units: Sequence[Dict[str, Any]]) -> List[Tuple[int, Dict[str, Any]]]:
    """(number, unit) for the object units that have a box; numbers match unit_labels."""
    result = []
    for number, unit in enumerate(units, start=1):
        if unit.get("source") == OBJECT and unit.get("box") is not None:
            result.append((number, unit))
    return result


def unit_text(unit: Dict[str, Any]) -> str:
    score = unit.get("score")
    return unit["label"] if score is None else f"{unit['label']} {score:.2f}"


def unit_labels(units: Sequence[Dict[str, Any]]) -> List[str]:
    """Column names of the heatmap: objects numbered like their boxes, caption words quoted."""
    labels = []
    for number, unit in enumerate(units, start=1):
        if unit.get("source") == OBJECT:
            labels.append(f"[{number}] {unit['label']}")
        else:
            labels.append(f"\u201c{unit['label']}\u201d")
    return labels


def token_labels(doc: Doc) -> List[str]:
    """Row names of the heatmap: the token, with the predicted entity tag if any."""
    return [
        token.text if token.ent_iob_ in ("", "O") else f"{token.text} [{token.ent_iob_}-{token.ent_type_}]"
        for token in doc
    ]


# ----- the heatmap figure ----------------------------------------------------------------
def attention_figure(explanation: Explanation):
    """A matplotlib Figure: tokens x units attention, and the gate value of each token."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = token_labels(explanation.doc)
    columns = unit_labels(explanation.units)
    attention, gate = explanation.attention, explanation.gate
    height = 1.6 + 0.28 * max(1, len(rows))
    width = 3.2 + 0.55 * max(1, len(columns)) + (0.9 if gate is not None else 0)
    figure = Figure(figsize=(min(width, 24), min(height, 30)), dpi=110, layout="constrained")
    if attention is None:
        axis = figure.subplots()
        axis.axis("off")
        axis.text(0.5, 0.5, "No attention recorded\n(empty post, or a fusion without attention)",
                  ha="center", va="center")
        figure.suptitle(explanation.name)
        return figure
    ratios = [max(1, len(columns))] + ([1] if gate is not None else [])
    axes = figure.subplots(1, len(ratios), width_ratios=ratios, sharey=True, squeeze=False)[0]
    _heatmap(axes[0], attention, rows, columns, vmax=1.0, cmap="viridis")
    axes[0].set_title("attention over visual units" if columns else "no visual units: text only")
    if gate is not None:
        _heatmap(axes[1], gate.reshape(-1, 1), rows, ["gate"], vmax=1.0, cmap="magma")
        axes[1].set_title("gate")
    figure.suptitle(explanation.name)
    return figure


def _heatmap(axis, values: numpy.ndarray, rows: List[str], columns: List[str], vmax: float, cmap: str):
    shown = values if values.shape[1] else numpy.zeros((values.shape[0], 1), dtype="float32")
    axis.imshow(shown, vmin=0.0, vmax=vmax, cmap=cmap, aspect="auto",
                alpha=1.0 if values.shape[1] else 0.0)
    axis.set_yticks(range(len(rows)), labels=rows, fontsize=8)
    axis.set_xticks(range(len(columns)), labels=columns, rotation=45, ha="right", fontsize=8)
    if values.size and values.size <= MAX_ANNOTATED_CELLS:
        for (i, j), value in numpy.ndenumerate(values):
            axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                      color="black" if value > 0.6 * vmax else "white")


def save_figure(figure, path: Path) -> Path:
    figure.savefig(path, format="png")
    return path


# ----- the HTML report -------------------------------------------------------------------
CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px;
       color: #222; max-width: 1100px; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; border-bottom: 1px solid #ddd; }
.note { color: #666; font-style: italic; }
.chips span { display: inline-block; padding: 2px 8px; margin: 2px; border-radius: 10px;
              background: #eef; border: 1px solid #99c; font-size: 13px; }
img.post { max-width: 100%; max-height: 480px; border: 1px solid #ccc; }
table.heat { border-collapse: collapse; font-size: 12px; }
table.heat th, table.heat td { border: 1px solid #e4e4e4; padding: 3px 6px; text-align: center; }
table.heat th.token { text-align: right; font-weight: normal; white-space: nowrap; }
table.heat th.entity { font-weight: bold; }
table.heat td.gate { border-left: 3px solid #888; }
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def render_html(explanation: Explanation, model_name: str = "") -> str:
    """The report of one post as a self-contained HTML page."""
    e = explanation
    parts = [
        f"<h1>{html.escape(e.name)}</h1>",
        f"<p class='note'>model: {html.escape(model_name)}</p>" if model_name else "",
        "<h2>Predicted entities</h2>",
        _displacy(e.doc),
        confidence_table(e.doc),
    ]
    if e.gold is not None:
        parts += ["<h2>Gold entities</h2>", _displacy(e.gold)]
    parts.append("<h2>Image</h2>")
    if e.image is not None:
        n_boxes = len(object_units_with_boxes(e.units))
        parts.append(f"<img class='post' alt='post image' src='{image_data_uri(e.image)}'>")
        parts.append(f"<p class='note'>{n_boxes} detected object(s) drawn.</p>" if n_boxes
                     else "<p class='note'>No object units with boxes for this post.</p>")
    else:
        why = e.image_note or "This post has no image."
        parts.append(f"<p class='note'>{html.escape(why)}</p>")
    parts.append("<h2>Caption</h2>")
    caption = e.doc._.image_caption
    parts.append(f"<p>{html.escape(caption)}</p>" if caption else "<p class='note'>No caption.</p>")
    caption_units = [u for u in e.units if u.get("source") != OBJECT]
    if caption_units:
        chips = "".join(f"<span>{html.escape(u['label'])}</span>" for u in caption_units)
        parts.append(f"<p>Caption units: <span class='chips'>{chips}</span></p>")
    elif caption:
        parts.append("<p class='note'>No caption units (no caption word has a vector, "
                     "or the pipeline does not use captions).</p>")
    parts += ["<h2>Attention (tokens \u00d7 visual units) and gate</h2>", attention_table(e)]
    body = "\n".join(p for p in parts if p)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
        f"<title>{html.escape(e.name)}</title><style>{CSS}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )


def _displacy(doc: Doc) -> str:
    if not len(doc):
        return "<p class='note'>Empty post.</p>"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\[W006\]")  # no entities: plain text is right
        # the package's colours, also where the entry point is not installed (a source checkout)
        return displacy.render(doc, style="ent", page=False, jupyter=False,
                               options={"colors": ENTITY_COLOURS})


def confidence_table(doc: Doc) -> str:
    """The predicted entities with their confidence (the CRF's, as ``min_confidence``
    thresholds it); nothing for a post without entities."""
    if not doc.ents:
        return ""
    rows = []
    for ent in doc.ents:
        confidence = ent._.agban_confidence
        shown = "n/a" if confidence is None else f"{confidence:.3f}"
        colour = ENTITY_COLOURS.get(ent.label_, "#ddd")
        rows.append(f"<tr><td>{html.escape(ent.text)}</td>"
                    f"<td><span style='background:{colour};padding:1px 6px'>{html.escape(ent.label_)}</span></td>"
                    f"<td>{shown}</td></tr>")
    return ("<table class='heat'><tr><th>entity</th><th>label</th><th>confidence</th></tr>"
            + "".join(rows) + "</table>")


def attention_table(e: Explanation) -> str:
    """The heatmap as an HTML table: cell shade = attention weight, last column = gate."""
    if e.attention is None:
        return ("<p class='note'>No attention recorded (an empty post, or a pipeline "
                "whose fusion has no attention).</p>")
    header = "".join(f"<th>{html.escape(c)}</th>" for c in unit_labels(e.units))
    if e.gate is not None:
        header += "<th>gate</th>"
    rows = []
    for i, token in enumerate(e.doc):
        entity = token.ent_iob_ not in ("", "O")
        cells = "".join(_cell(v) for v in e.attention[i])
        if e.gate is not None:
            cells += _cell(float(e.gate[i]), css_class="gate", rgb=(214, 90, 49))
        label = html.escape(token_labels(e.doc)[i])
        rows.append(f"<tr><th class='token{' entity' if entity else ''}'>{label}</th>{cells}</tr>")
    note = "" if e.units else (
        "<p class='note'>This post has no visual units: every attention row is empty and the "
        "model used the text alone.</p>")
    legend = ("<p class='note'>Each row: how the token's attention is spread over the visual "
              "units (eq. 9, sums to 1). Gate: the token's mean gate value, how much of the "
              "attended visual feature is added to it (eq. 11-14).</p>")
    return (f"{note}<table class='heat'><tr><th></th>{header}</tr>\n" + "\n".join(rows)
            + f"</table>{legend}")


def _cell(value: float, css_class: str = "", rgb: Tuple[int, int, int] = (49, 104, 214)) -> str:
    colour = f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{min(max(value, 0.0), 1.0):.3f})"
    text_colour = "#fff" if value > 0.55 else "#222"
    cls = f" class='{css_class}'" if css_class else ""
    return (f"<td{cls} style='background:{colour};color:{text_colour}' title='{value:.4f}'>"
            f"{value:.2f}</td>")


def image_data_uri(image: Image.Image, format: str = "JPEG") -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=format, quality=85)
    mime = "jpeg" if format == "JPEG" else format.lower()
    return f"data:image/{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def render_index(reports: Sequence[Tuple[Explanation, Path]]) -> str:
    items = "".join(
        f"<li><a href='{html.escape(path.name)}'>{html.escape(e.name)}</a>: "
        f"{html.escape(e.doc.text[:100])}</li>" for e, path in reports
    )
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>explain</title>"
            f"<style>{CSS}</style></head><body><h1>Posts</h1><ul>{items}</ul></body></html>\n")


def write_reports(
    explanations: Sequence[Explanation], output_dir: Path, model_name: str = ""
) -> List[Tuple[Path, Path]]:
    """Write ``<name>.html`` and ``<name>.attention.png`` per post (+ index.html)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for e in explanations:
        html_path = output_dir / f"{e.name}.html"
        html_path.write_text(render_html(e, model_name), encoding="utf-8")
        png_path = save_figure(attention_figure(e), output_dir / f"{e.name}.attention.png")
        written.append((html_path, png_path))
    if len(explanations) > 1:
        index = render_index([(e, paths[0]) for e, paths in zip(explanations, written)])
        (output_dir / "index.html").write_text(index, encoding="utf-8")
    return written


# ----- the command -----------------------------------------------------------------------
def explain_command(
    model: Path = typer.Argument(..., help="A trained pipeline with an agban component"),
    output_dir: Path = typer.Option(Path("explain"), "--output", "-o", help="Where to write the reports"),
    text: Optional[str] = typer.Option(None, help="The text of one post"),
    image: Optional[Path] = typer.Option(None, help="The image of that post (relative: to --image-root if given, else to the current folder)"),
    caption: Optional[str] = typer.Option(None, help="The caption (alt text) of that post's image"),
    name: str = typer.Option("post", help="File name (stem) of the one post's report"),
    docs: Optional[Path] = typer.Option(None, help="A .spacy file of posts instead of --text"),
    limit: int = typer.Option(10, help="With --docs: at most this many posts (0: all)"),
    image_id: List[str] = typer.Option([], help="With --docs: only posts of this image id (repeatable)"),
    image_root: Optional[Path] = typer.Option(None, help="Folder the posts' image paths are relative to (default: the pipeline's image_root)"),
    component: str = typer.Option("agban", help="Name of the agban component in the pipeline"),
) -> None:
    """Write an HTML report and an attention heatmap PNG per post: what the model looked at."""
    if (text is None) == (docs is None):
        typer.echo("error: give either --text (one post) or --docs (a .spacy file)", err=True)
        raise typer.Exit(1)
    if docs is not None and (image is not None or caption is not None):
        typer.echo("error: --image and --caption go with --text, not --docs", err=True)
        raise typer.Exit(1)
    if image is not None:  # checked and given to the model as one absolute path
        image = ((image_root / image) if image_root is not None else image).expanduser().resolve()
    for path in [p for p in (model, docs, image_root, image) if p is not None]:
        if not path.exists():
            typer.echo(f"error: {path} does not exist", err=True)
            raise typer.Exit(1)
    nlp = load_pipeline(model, component)
    image_root = use_image_root(nlp, component, image_root)
    if docs is not None:
        posts = read_docs(docs, nlp, limit, image_id)
        names = None
        if not posts:
            typer.echo(f"error: no posts selected from {docs}", err=True)
            raise typer.Exit(1)
    else:
        post = nlp.make_doc(text or "")
        post._.image = image
        post._.image_caption = caption
        posts, names = [post], [_UNSAFE_NAME.sub("_", name)]
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        explanations = explain_docs(nlp, posts, names=names, image_root=image_root,
                                    with_gold=docs is not None)
    written = write_reports(explanations, output_dir, model_name=str(model))
    for html_path, png_path in written:
        typer.echo(f"{html_path}  {png_path}")
