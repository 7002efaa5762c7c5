"""``image_captioner``: turn ``doc._.image`` into ``doc._.image_caption`` inside the pipeline.

The pipelines this project recommends read the image through its caption (the
caption in the transformer's input, caption units in ``agban``). A user holds posts
and photos, not captions: this component writes the caption an image-to-text model
gives for the photo, where the doc has no caption of its own, and records where each
caption came from in ``doc._.image_caption_source``.

- The model is a Hugging Face image-to-text model (BLIP, BLIP-2, GIT, ...), named on
  the Hub or saved in a folder, loaded with ``transformers``' own classes: no remote
  code, weights from safetensors files only (never unpickled). Like the detector
  weights, nothing is downloaded unless the config allows it (``allow_download``).
- The weights are not copied into a saved pipeline: its config names the model, which
  comes from the Hugging Face cache or the folder each time the pipeline loads.
- Captions are generated once per image content and captioner: a SQLite store
  (:mod:`.caption_store`) keyed like the object features, read before the model.
- A bad image (missing, corrupt, too large, refused) costs its doc the caption, after
  a warning naming it; the batch goes on.
"""
import copy
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from spacy.language import Language
from spacy.tokens import Doc
from spacy.util import minibatch

from .base import CaptionWarning, SkipWarnings, caption_of
from .caption_store import CaptionStore, default_store_path
from ..detection.images import (
    DEFAULT_MAX_PIXELS, ImageLoader, ImageLoadError, ImageSource, ImageWarning, KeyedImage, content_key, describe,
    first_per_key, key_images,
)

#: Small enough for a CPU (about 250M parameters) and native to transformers.
DEFAULT_CAPTION_MODEL = "Salesforce/blip-image-captioning-base"
#: Bumped whenever what :meth:`ImageCaptioner.generate` returns for an image changes.
CAPTION_VERSION = 1
#: Captions kept in memory by a captioner without a store (cache = false).
MAX_MEMO = 100_000
GIVEN, GENERATED, FAILED = "given", "generated", "failed"
#: The line that adds the stage (printed by the warning of a pipeline that reads captions).
ADD_STAGE = (
    f'nlp.add_pipe("image_captioner", first=True, config={{"model": "{DEFAULT_CAPTION_MODEL}", '
    '"allow_download": True})'
)


class CaptionModelError(OSError):
    """The image-to-text model cannot be loaded (not downloaded, not allowed, not safetensors)."""


class MissingCaptionWarning(UserWarning):
    """Docs with an image and no caption reached a component that reads captions."""


@Language.factory(
    "image_captioner",
    assigns=["doc._.image_caption", "doc._.image_caption_source"],
    default_config={
        "model": DEFAULT_CAPTION_MODEL,
        "revision": None,
        "allow_download": False,
        "store": None,
        "cache": True,
        "image_root": None,
        "allow_remote": False,
        "max_pixels": DEFAULT_MAX_PIXELS,
        "max_side": 1024,
        "batch_size": 8,
        "overwrite": False,
        "device": "auto",
        "half_precision": True,
        "generation": {"max_new_tokens": 30, "num_beams": 3},
    },
)
def make_image_captioner(
    nlp: Language,
    name: str,
    model: str,
    revision: Optional[str],
    allow_download: bool,
    store: Optional[str],
    cache: bool,
    image_root: Optional[str],
    allow_remote: bool,
    max_pixels: int,
    max_side: Optional[int],
    batch_size: int,
    overwrite: bool,
    device: str,
    half_precision: bool,
    generation: Dict[str, Any],
) -> "ImageCaptioner":
    """Fill ``doc._.image_caption`` from ``doc._.image`` with an image-to-text model.

    model: a Hugging Face model name (``revision`` pins its commit) or a folder saved
        with ``save_pretrained`` (processor and model, safetensors weights).
    allow_download: fetch a named model missing from the Hugging Face cache; off, a
        missing model is one error at load that says how to get it.
    store: the SQLite caption cache (None: ``~/.cache/spacy_agban/captions.sqlite``,
        see :func:`~.caption_store.default_store_path`); cache = false keeps captions
        in memory only, for this process.
    image_root, allow_remote, max_pixels: how ``doc._.image`` is read, as for the
        object units (:class:`~spacy_agban.detection.images.ImageLoader`); images
        are decoded at most ``max_side`` pixels on the long side (the processor
        resizes them much smaller).
    batch_size: images per ``generate`` call. overwrite: caption docs that have one.
    device: ``auto`` (spaCy's: the GPU after ``spacy.prefer_gpu()``), ``cpu``, ``cuda:0``;
        on a GPU the model runs in float16 unless ``half_precision = false``.
    generation: ``model.generate`` settings (max_new_tokens, num_beams, ...).
    """
    return ImageCaptioner(
        name, model=model, revision=revision, allow_download=allow_download,
        store=store, cache=cache, image_root=image_root, allow_remote=allow_remote,
        max_pixels=max_pixels, max_side=max_side, batch_size=batch_size, overwrite=overwrite,
        device=device, half_precision=half_precision, generation=generation,
    )


@dataclass
class CaptionOutcome:
    """What happened to one image: ``cached`` (read from the store), ``generated``
    or ``failed`` (with the reason and, for an image that could not be read, the
    :class:`~spacy_agban.detection.images.ImageLoadError` kind)."""

    status: str
    caption: Optional[str] = None
    name: Optional[str] = None
    reason: Optional[str] = None
    kind: Optional[str] = None


class ImageCaptioner:
    """The ``image_captioner`` component (see :func:`make_image_captioner`)."""

    def __init__(
        self,
        name: str = "image_captioner",
        *,
        model: str = DEFAULT_CAPTION_MODEL,
        revision: Optional[str] = None,
        allow_download: bool = False,
        store: Optional[Union[str, Path]] = None,
        cache: bool = True,
        image_root: Optional[Union[str, Path]] = None,
        allow_remote: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_side: Optional[int] = 1024,
        batch_size: int = 8,
        overwrite: bool = False,
        device: str = "auto",
        half_precision: bool = True,
        generation: Optional[Dict[str, Any]] = None,
    ):
        if batch_size < 1:
            raise ValueError(f"image_captioner batch_size must be at least 1, got {batch_size}")
        self.name = name
        self.model_name = str(model)
        self.revision = revision
        self.overwrite = overwrite
        self.batch_size = batch_size
        self.max_side = max_side
        self.loader = ImageLoader(image_root=image_root, allow_remote=allow_remote, max_pixels=max_pixels,
                                  max_side=max_side)
        self.processor, self.model, self.weights_id = load_image_to_text(self.model_name, revision, allow_download)
        self.generation = generation_settings(self.model, dict(generation or {}))
        self.device = resolve_caption_device(device)
        self.half = bool(half_precision) and self.device.type == "cuda"
        self.model.to(self.device)
        if self.half:
            self.model.half()
        self.model.eval()
        self._store_arg = store
        self._store: Optional[CaptionStore] = None
        self.cache = cache
        #: Without a store (cache = false): this process's captions, by content key.
        self._memo: Dict[str, str] = {}
        self._key_memo: Dict[Any, str] = {}
        self._signature: Optional[str] = None
        #: Captions read before the store, as the object units' ``features``: the batch
        #: engines attach a features dataset's captions here (``tag --features``); if it
        #: is ``writable`` it also receives the captions generated (``put_many``).
        self.features: Optional[Any] = None
        self.skipped = SkipWarnings("images", ImageWarning)
        self.skipped_captions = SkipWarnings("captions", CaptionWarning)
        # Counters, for tests and summaries: distinct images per lookup.
        self.n_generated = 0
        self.n_store_hits = 0
        self.n_feature_hits = 0

    # -- configuration ----------------------------------------------------------------

    @property
    def store(self) -> Optional[CaptionStore]:
        if self._store is None and self.cache:
            self._store = CaptionStore(self._store_arg or default_store_path())
        return self._store

    def description(self) -> Dict[str, Any]:
        """Everything that changes a stored caption. Device and precision are left out,
        as for the detector: a store filled on a GPU serves a CPU."""
        return {
            # a folder is known by its files' hash: moved or copied, it keeps its captions
            "model": self.model_name if self.weights_id.startswith("hub:") else Path(self.model_name).name,
            "weights": self.weights_id,
            "processor": _processor_hash(self.processor),
            "generation": self.generation,
            "max_side": self.max_side,
            "caption_version": CAPTION_VERSION,
        }

    @property
    def signature(self) -> str:
        """The key of :meth:`description`, under which the store keeps this captioner's captions."""
        if self._signature is None:
            description = self.description()
            self._signature = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]
            if self.store is not None:
                self.store.register_signature(self._signature, description)
        return self._signature

    def use_image_root(self, folder: Union[str, Path]) -> None:
        """Resolve relative image paths against this folder from now on."""
        self.loader.image_root = Path(folder).resolve()
        self._key_memo.clear()

    # -- spaCy ------------------------------------------------------------------------

    def __call__(self, doc: Doc) -> Doc:
        self.caption_docs([doc])
        return doc

    def pipe(self, stream: Iterable[Doc], *, batch_size: int = 128) -> Iterator[Doc]:
        """Caption each batch of docs at once (images of a batch are deduplicated,
        looked up together and generated ``self.batch_size`` at a time)."""
        for docs in minibatch(stream, size=batch_size):
            self.caption_docs(docs)
            yield from docs

    def caption_docs(self, docs: Sequence[Doc]) -> None:
        """Set the caption and its source of each doc of ``docs``."""
        todo: List[Tuple[Doc, Any]] = []
        for doc in docs:
            given = caption_of(doc, self.skipped_captions)
            image = doc._.get("image")
            if given is not None and (not self.overwrite or image is None):
                if doc._.get("image_caption_source") is None:
                    doc._.image_caption_source = {"origin": GIVEN}
                continue
            if image is not None:
                todo.append((doc, image))
        outcomes = self.captions_for([image for _, image in todo]) if todo else []
        for (doc, _), outcome in zip(todo, outcomes):
            if outcome.status in ("cached", GENERATED):
                doc._.image_caption = outcome.caption or None
                doc._.image_caption_source = {"origin": GENERATED, "model": self.model_name}
            elif caption_of(doc, self.skipped_captions) is not None:  # overwrite, and it failed
                doc._.image_caption_source = {"origin": GIVEN}
            else:
                doc._.image_caption_source = {"origin": FAILED, "model": self.model_name,
                                              "reason": outcome.reason or "no caption"}
        self.skipped.report()  # a batch ends here

    # -- captions by image --------------------------------------------------------------

    def captions_for(self, refs: Sequence[Any]) -> List[CaptionOutcome]:
        """One :class:`CaptionOutcome` per image reference (a path, a URL, a PIL image)."""
        outcomes: List[Optional[CaptionOutcome]] = [None] * len(refs)
        keyed, failed = key_images(refs, self._content_key)
        for i, err in failed.items():
            outcomes[i] = self._failed(err)
        found = self.lookup(list(keyed.values())) if keyed else {}
        for i, image in keyed.items():
            outcomes[i] = found[image.key]
        return outcomes  # type: ignore[return-value]

    def lookup(self, images: Sequence[KeyedImage]) -> Dict[str, CaptionOutcome]:
        """One outcome per distinct content key: the attached ``features`` (if any),
        this process's captions or the store, then the model on the misses (new
        captions are written back). The one keyed lookup: the pipe and the ``tag``
        engines (which read and hash the images themselves) both call it."""
        first = first_per_key(images)
        found: Dict[str, CaptionOutcome] = {}
        hits: Dict[str, str] = {}
        if self.features is not None:
            hits = self.features.get_many(list(first), self.signature)
            self.n_feature_hits += len(hits)
        rest = [key for key in first if key not in hits]
        if self.store is not None and rest:
            stored = self.store.get_many(rest, self.signature)
            self.n_store_hits += len(stored)
            hits.update(stored)
        elif self.store is None:
            hits.update((key, self._memo[key]) for key in rest if key in self._memo)
        for key, caption in hits.items():
            found[key] = CaptionOutcome("cached", caption, describe(first[key].ref))
        pending = [key for key in first if key not in hits]
        for start in range(0, len(pending), self.batch_size):
            found.update(self._generate_misses([first[key] for key in pending[start : start + self.batch_size]]))
        return found

    def _generate_misses(self, images: List[KeyedImage]) -> Dict[str, CaptionOutcome]:
        found: Dict[str, CaptionOutcome] = {}
        loaded = []
        for image in images:
            try:
                loaded.append((image.key, self.loader.decode(image.source or self.loader.read(image.ref))))
            except ImageLoadError as err:
                found[image.key] = self._failed(err)
        written = []
        for (key, image), result in zip(loaded, self._run_model([image.image for _, image in loaded])):
            if isinstance(result, Exception):
                found[key] = self._failed(ImageLoadError(image.name, f"captioning failed: {result}", "failed"))
                continue
            written.append((key, result))
            found[key] = CaptionOutcome(GENERATED, result, image.name)
        if written and self.store is not None:
            self.store.put_many(written, self.signature)
        elif written:
            if len(self._memo) > MAX_MEMO:  # a long run without a store: memory stays bounded
                self._memo.clear()
            self._memo.update(written)
        if written and self.features is not None and self.features.writable:
            self.features.put_many(written, self.signature, self.description())
        return found

    def _run_model(self, images: List[Any]) -> List[Union[str, Exception]]:
        """Caption a chunk; if it fails, image by image, so one bad image costs only itself."""
        if not images:
            return []
        try:
            captions: List[Union[str, Exception]] = list(self.generate(images))
            self.n_generated += len(images)
            return captions
        except Exception as err:
            if len(images) == 1:
                return [err]
        return [result for image in images for result in self._run_model([image])]

    def generate(self, images: Sequence[Any]) -> List[str]:
        """Captions of decoded RGB PIL images, one ``generate`` call."""
        import torch

        inputs = self.processor(images=list(images), return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if self.half and "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].half()
        with torch.inference_mode():
            ids = self.model.generate(**inputs, **self.generation)
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [" ".join(text.split()) for text in texts]

    # -- images -------------------------------------------------------------------------

    def _content_key(self, ref: Any) -> Tuple[str, Optional[ImageSource]]:
        return content_key(self.loader, ref, self._key_memo)

    def _failed(self, err: ImageLoadError) -> CaptionOutcome:
        self.skipped.warn(
            err.path,
            f"Skipping image {err.path!r}: {err.reason}. Its doc gets no caption from "
            f"the {self.name} component (it is tagged from what else it has).",
            stacklevel=4,
        )
        return CaptionOutcome(FAILED, None, err.path, err.reason, err.kind)


# -- loading ------------------------------------------------------------------------------


def _looks_like_path(name: str) -> bool:
    """A folder the user meant, rather than a Hub name (``owner/name``)."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


#: The files of a Hub model that are fetched: configs, vocabularies and safetensors
#: weights; never code (``*.py``) and never pickled weights (``*.bin``, ``*.pt``, ``*.h5``).
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]


def load_image_to_text(model: str, revision: Optional[str] = None,
                       allow_download: bool = False) -> Tuple[Any, Any, str]:
    """(processor, model, weights id) of a Hugging Face image-to-text model.

    A folder is read as it is; a Hub name from the Hugging Face cache, or downloaded
    only with ``allow_download``. No remote code runs and only safetensors weights are
    read. Every failure is one :class:`CaptionModelError` that says what to do.
    """
    folder = Path(model).expanduser()
    is_folder = folder.is_dir()
    if not is_folder and _looks_like_path(model):
        raise CaptionModelError(f"image-to-text model folder {model!r} not found ({folder.resolve()}): "
                                "save one with processor.save_pretrained and model.save_pretrained, or "
                                "name a model on the Hugging Face Hub")
    if not is_folder:
        folder = hub_snapshot(model, revision, allow_download)
    from transformers import AutoProcessor

    # Everything is read from the folder from here on: transformers' AutoProcessor asks the
    # Hub for processor_config.json even with local_files_only=True (4.53 drops the flag).
    kwargs: Dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    try:
        processor = AutoProcessor.from_pretrained(str(folder), **kwargs)
        module = _model_class(str(folder), kwargs).from_pretrained(str(folder), use_safetensors=True, **kwargs)
    except CaptionModelError:
        raise
    except (OSError, ValueError) as err:
        raise CaptionModelError(model_error_message(model, True, allow_download, err)) from None
    module.eval()
    commit = None if is_folder else folder.name  # the cache keeps a snapshot per commit
    return processor, module, _weights_id(folder, model, commit)


def hub_snapshot(model: str, revision: Optional[str], allow_download: bool) -> Path:
    """The local snapshot of a Hub model: from the cache, or fetched (its configs and
    safetensors files only) where downloads are allowed."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, revision=revision, allow_patterns=HUB_FILES,
                                      local_files_only=not allow_download))
    except (OSError, ValueError) as err:  # the Hub client's errors derive from both
        raise CaptionModelError(model_error_message(model, False, allow_download, err)) from None


def _model_class(source: str, kwargs: Dict[str, Any]) -> Any:
    """transformers' image-to-text Auto class that knows this model's config
    (``AutoModelForImageTextToText``; ``AutoModelForVision2Seq`` in older releases)."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, **kwargs)
    for name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq"):
        auto = getattr(transformers, name, None)
        if auto is not None and type(config) in auto._model_mapping:
            return auto
    raise CaptionModelError(f"{source!r} is a {config.model_type!r} model, not an image-to-text model "
                            "transformers can load (BLIP, BLIP-2, GIT, ... with a generate method)")


def model_error_message(model: str, loading: bool, allow_download: bool, err: BaseException) -> str:
    """One line: why the model cannot be had, and how to get it. ``loading``: its files
    are at hand (a folder, a cached snapshot) but do not load."""
    reason = " ".join(str(err).split())[:300]
    if loading and "safetensors" in reason.lower():
        return (f"the image-to-text model {model!r} has no safetensors weights, and weights are never "
                "unpickled: choose a model that ships model.safetensors, or convert its weights and "
                "name the folder.")
    if loading:
        return (f"cannot load the image-to-text model {model!r}: {reason}. A folder needs the processor "
                "and the model as save_pretrained writes them.")
    how = (f"download it where there is internet (`huggingface-cli download {model}`) and copy the "
           "Hugging Face cache here, or save it with save_pretrained and set model to that folder")
    if not allow_download:
        return (f"the image-to-text model {model!r} is not in the Hugging Face cache, and downloading "
                "it is not allowed: set allow_download = true in the captioner's config (`--allow-download` "
                f"on the command line) to fetch it, or {how}.")
    return f"cannot download the image-to-text model {model!r} ({reason}). Without internet, {how}."


def _weights_id(folder: Path, model: str, commit: Optional[str]) -> str:
    """The identity of the weights: the Hub commit, or the sha256 of the folder's files."""
    if commit:
        return f"hub:{model}@{commit}"
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")) + [folder / "config.json"]:
        if path.is_file():
            digest.update(path.name.encode())
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(2**20), b""):
                    digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def _processor_hash(processor: Any) -> str:
    image_processor = getattr(processor, "image_processor", processor)
    try:
        text = image_processor.to_json_string()
    except Exception:  # a processor without a JSON form: its class name
        text = type(image_processor).__name__
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def generation_settings(model: Any, settings: Dict[str, Any]) -> Dict[str, Any]:
    """The ``generate`` settings, checked against the model's generation config at
    load (a misspelt one is an error here, not on the first batch)."""
    config = copy.deepcopy(model.generation_config)
    unused = config.update(**settings)
    if unused:
        raise ValueError(f"unknown generation settings for the image captioner: {sorted(unused)} "
                         "(use model.generate's names: max_new_tokens, num_beams, min_length, ...)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config.validate()
    return dict(sorted(settings.items()))


def resolve_caption_device(device: str) -> Any:
    """``auto``: the device spaCy computes on (the GPU after ``spacy.prefer_gpu()``)."""
    import torch

    if device == "auto":
        from thinc.api import get_torch_default_device

        return get_torch_default_device()
    return torch.device(device)


# -- a pipeline that reads captions, given docs no captioner looked at ------------------------


def needs_caption(doc: Doc) -> bool:
    """An image, no caption, and no image-to-text stage has looked at the doc."""
    caption = doc._.get("image_caption")
    return (doc._.get("image") is not None and not (isinstance(caption, str) and caption)
            and doc._.get("image_caption_source") is None)


def warn_uncaptioned(count: int, component: str) -> None:
    if count:
        warnings.warn(
            f"{count} doc(s) have an image (doc._.image) but no caption, and no image-to-text "
            f"stage looked at them: the '{component}' component reads captions, so they were "
            f"tagged from their text alone. Add the stage that captions them: {ADD_STAGE}",
            MissingCaptionWarning,
            stacklevel=3,
        )


def captioner_pipes(nlp: Language) -> List[Tuple[str, ImageCaptioner]]:
    """The image_captioner components of a pipeline, by name."""
    return [(name, pipe) for name, pipe in nlp.pipeline if isinstance(pipe, ImageCaptioner)]
