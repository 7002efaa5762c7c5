"""Caption units from a frozen sentence encoder (e.g. all-MiniLM-L6-v2).

``spacy_agban.CaptionUnits.v1`` represents a caption by the static vectors of its
content words: each unit knows nothing of the rest of the caption ("man" in "a man
holding a trophy" and in "a man on a horse" is the same vector). This source runs the
caption through a frozen Hugging Face encoder instead and gives

- one ``<caption>`` unit: the mean of all word-piece states (how sentence-transformers
  pools all-MiniLM-L6-v2 into a sentence embedding), then
- one unit per content word (the mean of its word pieces' states, caption order),

``top_k`` units in all. The encoder is loaded from a local folder only
(``local_files_only``: nothing is fetched), lazily, on the GPU when thinc uses one.
Weights load from ``model.safetensors`` only (never a pickled ``.bin``).
It is not trained and not saved with the pipeline: the pipeline's config names the
folder, and loading the pipeline needs it there.
"""
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from spacy.tokens import Doc
from spacy.util import registry

from .caption_words import caption_words, is_content_word
from .base import CAPTION, CaptionWarning, SkipWarnings, UnitSource, VisualUnit, caption_of

SENTENCE_LABEL = "<caption>"


class CaptionEncoderUnits(UnitSource):
    """``doc._.image_caption`` -> up to ``top_k`` contextual caption units."""

    def __init__(
        self,
        model_path: str,
        top_k: int = 8,
        max_length: int = 64,
        batch_size: int = 64,
        cache_size: int = 20000,
        max_chars: int = 1000,
    ):
        if top_k < 0:
            raise ValueError(f"caption top_k must be >= 0, got {top_k}")
        path = Path(model_path)
        if not (path / "config.json").exists():
            raise ValueError(
                f"CaptionEncoderUnits needs a local Hugging Face model folder with a "
                f"config.json, got {model_path!r}. Download the model yourself (e.g. "
                "`huggingface-cli download sentence-transformers/all-MiniLM-L6-v2 "
                "--local-dir DIR`) and set model_path = DIR; nothing is fetched at run time."
            )
        self.model_path = str(path)
        self.top_k = top_k
        self.max_length = max_length
        self.batch_size = batch_size
        self.cache_size = cache_size
        self.max_chars = max_chars
        self._encoder: Optional[Tuple[Any, Any, torch.device]] = None
        self._cache: "OrderedDict[str, List[VisualUnit]]" = OrderedDict()
        self.skipped = SkipWarnings("captions", CaptionWarning)

    @property
    def width(self) -> Optional[int]:
        """The encoder's hidden size: the dimension of every unit (read from config.json)."""
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(self.model_path, local_files_only=True).hidden_size)

    def _load(self) -> Tuple[Any, Any, torch.device]:
        if self._encoder is None:
            from thinc.api import get_torch_default_device
            from transformers import AutoModel, AutoTokenizer

            device = get_torch_default_device()
            tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
            if not tokenizer.is_fast:
                raise ValueError(f"{self.model_path} has no fast tokenizer (needed for word_ids)")
            # safetensors only: loading the encoder never unpickles a file
            model = AutoModel.from_pretrained(
                self.model_path, local_files_only=True, use_safetensors=True
            )
            model.eval().requires_grad_(False).to(device)
            self._encoder = (tokenizer, model, device)
        return self._encoder

    def caption_of(self, doc: Doc) -> Optional[str]:
        caption = caption_of(doc, self.skipped)
        return None if self.top_k == 0 else caption

    def __call__(self, docs: Sequence[Doc]) -> List[List[VisualUnit]]:
        """Captions not in the cache are encoded together, ``batch_size`` at a time."""
        captions = [self.caption_of(doc) for doc in docs]
        found: Dict[str, List[VisualUnit]] = {}
        todo = []
        for caption in dict.fromkeys(c for c in captions if c is not None):
            units = self._cache.get(caption)
            if units is None:
                todo.append(caption)
            else:
                self._cache.move_to_end(caption)
                found[caption] = units
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            for caption, units in zip(chunk, self._encode(chunk)):
                self._remember(caption, units)
                found[caption] = units
        self.skipped.report()  # a batch ends here
        return [found[caption] if caption is not None else [] for caption in captions]

    def _remember(self, caption: str, units: List[VisualUnit]) -> None:
        self._cache[caption] = units
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _split(self, caption: str) -> List[str]:
        return caption_words(caption, self.max_chars) or [caption.strip() or "."]

    @torch.no_grad()
    def _encode(self, captions: List[str]) -> List[List[VisualUnit]]:
        tokenizer, model, device = self._load()
        words = [self._split(c) for c in captions]
        enc = tokenizer(
            words, is_split_into_words=True, truncation=True, max_length=self.max_length,
            padding=True, return_tensors="pt",
        )
        states = model(**{k: v.to(device) for k, v in enc.items()}).last_hidden_state
        states = states.float().cpu().numpy()
        mask = enc["attention_mask"].numpy().astype(bool)
        result = []
        for i, split in enumerate(words):
            sentence = states[i][mask[i]].mean(axis=0)
            units = [VisualUnit(source=CAPTION, vector=sentence, label=SENTENCE_LABEL)]
            pieces: Dict[int, List[int]] = {}
            for j, w in enumerate(enc.word_ids(i)):
                if w is not None:
                    pieces.setdefault(w, []).append(j)
            seen = set()
            for w, word in enumerate(split):
                if len(units) >= self.top_k:
                    break
                lower = word.lower()
                if w not in pieces or lower in seen or not is_content_word(lower):
                    continue
                seen.add(lower)
                vector = states[i][pieces[w]].mean(axis=0)
                units.append(VisualUnit(source=CAPTION, vector=vector, label=lower))
            result.append(units[: self.top_k])
        return result


@registry.misc("spacy_agban.CaptionEncoderUnits.v1")
def make_caption_encoder_units(
    model_path: str, top_k: int = 8, max_length: int = 64, batch_size: int = 64
) -> CaptionEncoderUnits:
    return CaptionEncoderUnits(
        model_path, top_k=top_k, max_length=max_length, batch_size=batch_size
    )
