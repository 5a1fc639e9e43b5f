"""The conversation prefix cache: a follow-up question runs only the tokens after what was already computed.

After an answer, the engine keeps the transformers `DynamicCache` of the conversation (the keys and
values of every prompt and answer token) under the conversation's key and model version. The next
question renders the whole conversation again; `ConversationCache.take` compares its token ids with
the cached ones, crops the cache to the longest common prefix, and says how many image rows (images
or tiles) that prefix already encoded, so only the new images reach the vision tower. Greedy answers
are the same tokens as with a full encoding (tests/test_kv_cache.py).

Correctness never depends on the key: reuse needs equal token ids *and* the same images (by pixel
fingerprint) under the same image-processor settings; anything else cuts the prefix back or misses.
Memory is bounded by a byte budget with least-recently-used eviction; an evicted or missing
conversation is simply encoded in full.

Families: those whose image features replace image placeholder tokens one row of `pixel_values` per
run of placeholders, with plain 1-D positions, are listed in `IMAGE_AXIS`. Others fall back to a full
encoding: Qwen2-VL (3-D rotary positions computed from the whole prompt), Gemma 3 (bidirectional
attention within an image and sliding-window layers), Llama-3.2-Vision (cross-attention states).

    cache = ConversationCache(budget_bytes=512 * 2**20)
    reuse = cache.take("case-7", "v2", input_ids[0], fingerprints, rows_total=..., image_token_id=...)
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from PIL import Image

# model_type -> the axis of the processor's `pixel_values` that counts image rows (an image, or a tile of one).
IMAGE_AXIS = {"idefics3": 1, "llava": 0}
# Processor outputs that go with `pixel_values`, row for row (sliced with it).
_PIXEL_KEYS = ("pixel_values", "pixel_attention_mask")


def fingerprint(image: Image.Image) -> str:
    """The identity of an image's pixels (the same upload twice gives the same fingerprint)."""
    h = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def cache_nbytes(cache: Any) -> int:
    """Bytes held by a cache's key and value tensors (their storage, which a crop does not shrink)."""
    total = 0
    for layer in getattr(cache, "layers", ()):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.untyped_storage().nbytes()
    return total


@dataclass
class Reuse:
    """What a request can reuse: a cache holding `keep` tokens (None: encode everything) whose prefix
    already encoded the first `rows` image rows."""

    cache: Any | None = None
    keep: int = 0
    rows: int = 0


@dataclass
class _Entry:
    version: str
    ids: torch.Tensor  # the token ids whose keys/values the cache holds, 1-D
    images: tuple[str, ...]  # fingerprints of the images given so far, in order
    signature: str  # the image processor's settings (tiling, sizes): other settings give other tokens and pixels
    cache: Any
    nbytes: int


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    reused_tokens: int = 0


class ConversationCache:
    """KV caches of live conversations, least recently used evicted first beyond `budget_bytes`."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = CacheStats()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, key: str, version: str, ids: torch.Tensor, images: Sequence[str], signature: str, *,
             rows_total: int, image_token_id: int | None) -> Reuse:
        """Remove the conversation's entry and return what of it the prompt `ids` can reuse.

        The entry is taken out because generation grows the cache in place; `put` stores it again."""
        with self._lock:
            entry = self._entries.pop(key, None)
        if entry is None or entry.version != version or entry.signature != signature:
            self.stats.misses += 1
            return Reuse()
        n = min(len(entry.ids), len(ids))
        differ = (entry.ids[:n] != ids[:n]).nonzero()
        keep = int(differ[0]) if len(differ) else n
        keep = min(keep, len(ids) - 1)  # at least one token must run to give the next token's logits
        image_pos = (ids == image_token_id).nonzero().flatten() if image_token_id is not None else ids[:0]
        per_row = len(image_pos) // rows_total if rows_total else 0
        assert rows_total == 0 or per_row * rows_total == len(image_pos), "image tokens are not whole rows"
        rows = int((image_pos < keep).sum()) // per_row if per_row else 0
        differs = next((i for i, (a, b) in enumerate(zip(entry.images, images)) if a != b), None)
        if differs is not None:  # image `differs` starts at that row at the earliest (every image has a row or more)
            rows = min(rows, differs)
        if per_row and rows < rows_total:  # never keep part of a row: its features are merged as a whole
            keep = min(keep, int(image_pos[rows * per_row]))
        if keep <= 0:
            self.stats.misses += 1
            return Reuse()
        cache = entry.cache
        if cache.get_seq_length() > keep:
            cache.crop(keep - cache.get_seq_length())
        self.stats.hits += 1
        self.stats.reused_tokens += keep
        return Reuse(cache, keep, rows)

    def put(self, key: str, version: str, ids: torch.Tensor, images: Sequence[str], signature: str, cache: Any) -> None:
        """Keep `cache` (holding the keys/values of `ids`) as the conversation's, evicting the least recently used."""
        length = cache.get_seq_length()
        entry = _Entry(version, ids[:length].detach().clone(), tuple(images), signature, cache, cache_nbytes(cache))
        with self._lock:
            self._entries.pop(key, None)
            if entry.nbytes > self.budget_bytes:
                return
            self._entries[key] = entry
            while sum(e.nbytes for e in self._entries.values()) > self.budget_bytes:
                self._entries.popitem(last=False)
                self.stats.evictions += 1

    def drop(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def drop_version(self, version: str) -> None:
        """Forget every conversation computed by `version` (its adapter was removed or replaced)."""
        with self._lock:
            for key in [k for k, e in self._entries.items() if e.version == version]:
                del self._entries[key]

    def rename(self, old: str, new: str) -> None:
        """Move an entry to another key (e.g. once a new conversation has its stored id)."""
        with self._lock:
            entry = self._entries.pop(old, None)
            if entry is not None:
                self._entries[new] = entry

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def slice_pixels(inputs: dict[str, torch.Tensor], axis: int, rows: int) -> dict[str, torch.Tensor]:
    """The processor outputs without the first `rows` image rows (without any pixels when none is left)."""
    out = dict(inputs)
    if rows == 0 or "pixel_values" not in inputs:
        return out
    remaining = inputs["pixel_values"].shape[axis] - rows
    for k in _PIXEL_KEYS:
        if k in out:
            out[k] = out[k].narrow(axis, rows, remaining) if remaining else None
    return {k: v for k, v in out.items() if v is not None}


def processor_signature(processor: Any) -> str:
    """A short digest of the image processor's settings (tiling on/off, sizes)."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        return ""
    try:
        text = image_processor.to_json_string()
    except (TypeError, ValueError):  # a setting json cannot hold
        text = repr(vars(image_processor))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
