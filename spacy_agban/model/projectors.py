"""Text and visual projectors: both modalities into one d-dim space (G_T, G_V)."""
from typing import Dict, List, Optional, Union

import numpy
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .numpy_lstm import NumpyBiLSTM, fingerprint, numpy_ready
from .reference import use_reference


class CharBiLSTM(nn.Module):
    """One vector per token from its characters: final states of a BiLSTM.

    At prediction (``torch.inference_mode``) with token keys given, each token form's
    vector is computed once and kept until a weight changes: the shim's optimizer step
    clears the cache (it writes through numpy, which torch does not see), and a
    fingerprint of the parameters' storage and version counters, checked on every
    call, catches any torch-side change (``load_state_dict``, in-place ops). A post's
    tokens are mostly forms seen before, and the packed BiLSTM over a post's
    characters is the largest fixed cost of tagging one post alone; on CPU, a post's
    forms not seen yet go through a numpy copy of the BiLSTM (:class:`NumpyBiLSTM`),
    kept and dropped with the cache.
    """

    max_cached = 100_000  # forms; the cache starts over past this
    # new forms at once up to which numpy is faster than torch's packed BiLSTM (measured
    # on test posts: ~1.6x at 16 forms, even at 64, slower past it: it steps every row
    # to the longest form)
    numpy_max_rows = 64

    def __init__(self, n_chars: int, char_dim: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(n_chars, char_dim, padding_idx=0)
        self.lstm = nn.LSTM(char_dim, hidden, batch_first=True, bidirectional=True)
        self.width = 2 * hidden
        self._cache: Dict[int, Union[numpy.ndarray, torch.Tensor]] = {}  # numpy rows on CPU
        self._fingerprint: Optional[tuple] = None
        self._numpy: Optional[NumpyBiLSTM] = None

    def forward(
        self, char_ids: torch.Tensor, char_lengths: torch.Tensor, keys: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """(N, L) char ids of N real tokens, lengths >= 1 -> (N, 2 * hidden).

        keys: (N,) an id of each token's exact form (same form, same chars), for the cache.
        """
        if keys is None or self.training or not torch.is_inference_mode_enabled() or use_reference():
            return self.encode(char_ids, char_lengths)
        return self._cached(char_ids, char_lengths, keys)

    def encode(self, char_ids: torch.Tensor, char_lengths: torch.Tensor) -> torch.Tensor:
        if char_ids.shape[0] == 0:
            return char_ids.new_zeros((0, self.width), dtype=self.embed.weight.dtype)
        packed = pack_padded_sequence(
            self.embed(char_ids), char_lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        _, (final, _) = self.lstm(packed)
        return torch.cat([final[0], final[1]], dim=-1)

    def clear_cache(self) -> None:
        self._cache, self._numpy = {}, None

    def _cached(self, char_ids: torch.Tensor, char_lengths: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        current = fingerprint(self.embed, self.lstm)
        if current != self._fingerprint or len(self._cache) > self.max_cached:
            self.clear_cache()
            self._fingerprint = current
        cache = self._cache
        key_list = keys.tolist()
        missing: Dict[int, int] = {}  # form -> first row with it
        for row, key in enumerate(key_list):
            if key not in cache and key not in missing:
                missing[key] = row
        if missing:
            cache.update(zip(missing, self._encode_new(char_ids, char_lengths, list(missing.values()))))
        if not key_list:
            return self.encode(char_ids, char_lengths)
        vectors = [cache[key] for key in key_list]
        if isinstance(vectors[0], numpy.ndarray):
            return torch.from_numpy(numpy.stack(vectors))
        return torch.stack(vectors)

    def _encode_new(
        self, char_ids: torch.Tensor, char_lengths: torch.Tensor, rows: List[int]
    ) -> Union[numpy.ndarray, torch.Tensor]:
        """The vectors of ``rows``, to cache: numpy rows on CPU (float32), else tensors."""
        if not numpy_ready(self.embed.weight):
            index = torch.tensor(rows, dtype=torch.long, device=char_ids.device)
            return self.encode(char_ids[index], char_lengths[index])
        ids, lengths = char_ids.numpy()[rows], char_lengths.numpy()[rows]
        if len(rows) > self.numpy_max_rows:
            return self.encode(torch.from_numpy(ids), torch.from_numpy(lengths)).numpy()
        if self._numpy is None:
            self._numpy = NumpyBiLSTM(self.lstm, self.embed)
        return self._numpy.final_states(ids, lengths)


class TextProjector(nn.Module):
    """Word embedding + char BiLSTM, concatenated, then a word BiLSTM -> G_T.

    ``shape_dim`` > 0 adds an embedding of each token's shape (its case and a
    mention/hashtag prefix, ``featurize.word_shape``) to the concatenation.

    The word embedding is the frozen pretrained vector (looked up outside, passed in)
    plus a trainable table for the training vocabulary, initialized at zero: the same
    as GloVe-initialized embeddings fine-tuned on the words seen in training, while
    unseen words keep their GloVe vector. Without pretrained vectors the trainable
    table is randomly initialized instead.
    """

    def __init__(
        self,
        n_words: int,
        static_width: int,
        word_dim: int,
        n_chars: int,
        char_dim: int,
        char_hidden: int,
        hidden: int,
        dropout: float,
        external_width: int = 0,
        shape_dim: int = 0,
        n_shapes: int = 1,
    ):
        super().__init__()
        if static_width and word_dim != static_width:
            raise ValueError(
                f"word_dim ({word_dim}) must equal the width of the word vectors "
                f"({static_width}) when pretrained vectors are used"
            )
        if hidden % 2:
            raise ValueError(f"hidden must be even (two LSTM directions), got {hidden}")
        self.static_width = static_width
        # word_dim = 0 switches the word features off (token features from chars/external)
        self.word_embed = nn.Embedding(n_words, word_dim, padding_idx=0) if word_dim else None
        if static_width and self.word_embed is not None:
            nn.init.zeros_(self.word_embed.weight)
        self.chars = CharBiLSTM(n_chars, char_dim, char_hidden) if char_dim else None
        if shape_dim and n_shapes < 2:
            raise ValueError(f"shape_dim = {shape_dim} needs n_shapes >= 2 (padding + shapes), got {n_shapes}")
        self.shapes = nn.Embedding(n_shapes, shape_dim, padding_idx=0) if shape_dim else None
        in_width = word_dim + (self.chars.width if self.chars else 0) + shape_dim + external_width
        if in_width == 0:
            raise ValueError("TextProjector has no token features: no words, chars or external")
        self.dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(in_width, hidden // 2, batch_first=True, bidirectional=True)
        self.width = hidden

    def forward(
        self,
        word_ids: torch.Tensor,
        static_vectors: torch.Tensor,
        char_ids: torch.Tensor,
        char_lengths: torch.Tensor,
        token_mask: torch.Tensor,
        external: Optional[torch.Tensor] = None,
        token_keys: Optional[torch.Tensor] = None,
        shape_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if self.shapes is not None and shape_ids is None:
            raise ValueError("this TextProjector embeds word shapes: pass shape_ids")
        one_doc = token_mask.shape[0] == 1 and bool(token_mask.all())  # no padding
        parts = []
        if self.word_embed is not None:
            words = self.word_embed(word_ids)
            if self.static_width:
                words = words + static_vectors
            parts.append(words)
        if self.chars is not None:
            if one_doc:  # every token real: no masking
                keys = token_keys[0] if token_keys is not None else None
                parts.append(self.chars(char_ids[0], char_lengths[0], keys)[None])
            else:
                keys = token_keys[token_mask] if token_keys is not None else None
                per_token = self.chars(char_ids[token_mask], char_lengths[token_mask], keys)
                chars = per_token.new_zeros(token_mask.shape + (self.chars.width,))
                chars[token_mask] = per_token
                parts.append(chars)
        if self.shapes is not None:
            parts.append(self.shapes(shape_ids))
        if external is not None:
            parts.append(external)
        inputs = self.dropout(torch.cat(parts, dim=-1))
        if one_doc:  # packing only costs time
            return self.lstm(inputs)[0]
        lengths = token_mask.sum(dim=1).clamp(min=1).cpu()
        packed = pack_padded_sequence(inputs, lengths, batch_first=True, enforce_sorted=False)
        output, _ = self.lstm(packed)
        output, _ = pad_packed_sequence(output, batch_first=True, total_length=inputs.shape[1])
        return output


class VisualProjector(nn.Module):
    """Feed-forward network from each unit source's features to d -> G_V.

    Each source (1024-d objects, word-vector caption units) has its own input layer;
    the rest is shared, so all units land in one space with the tokens.
    """

    def __init__(self, source_dims: Dict[str, int], width: int, dropout: float):
        super().__init__()
        self.inputs = nn.ModuleDict(
            {source: nn.Linear(dim, width) for source, dim in source_dims.items()}
        )
        self.shared = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, width), nn.Tanh())
        self.width = width

    def forward(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """{source: (B, K_s, D_s)} -> (B, sum K_s, d), sources in a fixed order."""
        projected = [self.inputs[source](features[source]) for source in self.inputs]
        return self.shared(torch.cat(projected, dim=1))
