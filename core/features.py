"""Image features by image content: each image goes through the vision tower once.

The vision tower (plus the connector that turns its output into language-model embeddings) is the
largest part of answering an image question on CPU. Its output for an image depends only on the
image's pixels, the image-processor settings and the weights, so `FeatureCache` keeps it under
(fingerprint of the pixels, processor settings, weights): the same image asked about again, in a
follow-up, another conversation or another clinician's question, is not encoded again. The app
calls `Engine.prepare(images)` when an image is uploaded, so the encoding runs while the clinician
types. The images of a batch that are not cached yet go through the tower in one call.

Generation then receives the features instead of the pixels (transformers' `mm_encoder_outputs`,
the same path generate itself takes after encoding the pixels), so greedy answers are the tokens
of a normal run (tests/test_features.py). Memory: a byte budget, least recently used out.

Families: Idefics3/SmolVLM (`FEATURE_FAMILIES`: one row of `pixel_values` per image or tile, the
rows per image from the image processor, features merged in placeholder order). Others encode
their pixels at every question as before.

    cache = FeatureCache(budget_bytes=256 * 2**20)
    model_inputs = cache.substitute(model, image_processor, inputs, images, prints, weights="base", skip_rows=0)
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling

FEATURE_FAMILIES = {"idefics3"}
_PIXEL_KEYS = ("pixel_values", "pixel_attention_mask")


@dataclass
class FeatureStats:
    hits: int = 0  # images whose features were found
    encoded: int = 0  # images that went through the vision tower
    tower_calls: int = 0  # vision-tower calls (one per batch of missing images)
    evictions: int = 0


def rows_per_image(image_processor: Any, image: Image.Image) -> int:
    """How many rows of `pixel_values` (tiles plus the global view, or 1 without splitting) an image makes."""
    patches, _, _ = image_processor.get_number_of_image_patches(image.height, image.width)
    return max(int(patches), 1)


class FeatureCache:
    """Features per image content, least recently used evicted first beyond `budget_bytes`."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()  # key -> [rows, tokens per row, hidden]
        self._lock = threading.Lock()
        self._pending: dict[str, threading.Event] = {}  # keys being encoded now (by an upload's prepare, say)
        self.stats = FeatureStats()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(t.untyped_storage().nbytes() for t in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            t = self._entries.get(key)
            if t is not None:
                self._entries.move_to_end(key)
            return t

    def put(self, key: str, features: torch.Tensor) -> None:
        nbytes = features.untyped_storage().nbytes()
        if nbytes > self.budget_bytes:
            return
        with self._lock:
            self._entries[key] = features
            self._entries.move_to_end(key)
            while sum(t.untyped_storage().nbytes() for t in self._entries.values()) > self.budget_bytes:
                self._entries.popitem(last=False)
                self.stats.evictions += 1

    def drop_weights(self, weights: str) -> None:
        """Forget the features computed with `weights` (an adapter that changes the vision tower was removed)."""
        with self._lock:
            for key in [k for k in self._entries if k.startswith(f"{weights}|")]:
                del self._entries[key]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def substitute(self, model: Any, image_processor: Any, inputs: dict[str, Any], images: Sequence[Sequence[Image.Image]],
                   prints: Sequence[Sequence[str]], *, weights: str, signature: str, skip_rows: int = 0) -> dict[str, Any] | None:
        """`inputs` with the image features in place of the pixels (the first `skip_rows` rows left out: a
        conversation's cached prefix holds them), encoding the images not cached yet in one vision-tower call.
        None when the rows do not add up to the processor's (then the caller passes the pixels)."""
        pixels, mask = inputs["pixel_values"], inputs.get("pixel_attention_mask")
        layout: list[tuple[int, int, int, str]] = []  # (sample, first row, rows, key), in placeholder order
        for b, (sample_images, sample_prints) in enumerate(zip(images, prints)):
            row = 0
            for image, fp in zip(sample_images, sample_prints):
                n = rows_per_image(image_processor, image)
                layout.append((b, row, n, f"{weights}|{signature}|{fp}"))
                row += n
            real = int((pixels[b] != 0).flatten(1).any(1).sum())  # padding rows are all zeros (as transformers decides)
            if row != real:
                return None
        for key in {k for *_, k in layout}:  # a question right after its upload waits for that encoding, not a second one
            with self._lock:
                pending = self._pending.get(key)
            if pending is not None:
                pending.wait()
        found = {key: t for key in {k for *_, k in layout} if (t := self.get(key)) is not None}
        self.stats.hits += sum(key in found for *_, key in layout)
        missing = list({key: (b, r, n) for b, r, n, key in layout if key not in found}.items())
        if missing:
            found.update(self._encode(model, pixels, mask, missing))
        rows = torch.cat([found[key] for *_, key in layout])[skip_rows:]
        out = {k: v for k, v in inputs.items() if k not in _PIXEL_KEYS}
        if len(rows):
            out["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=[rows.flatten(0, 1)])}
        return out

    def _encode(self, model: Any, pixels: torch.Tensor, mask: torch.Tensor | None,
                missing: list[tuple[str, tuple[int, int, int]]]) -> dict[str, torch.Tensor]:
        """Run the missing images' rows through the vision tower together; cache and return their features."""
        with self._lock:
            events = {key: self._pending.setdefault(key, threading.Event()) for key, _ in missing}
        try:
            return self._run_tower(model, pixels, mask, missing)
        finally:
            with self._lock:
                for key, event in events.items():
                    self._pending.pop(key, None)
                    event.set()

    def _run_tower(self, model: Any, pixels: torch.Tensor, mask: torch.Tensor | None,
                   missing: list[tuple[str, tuple[int, int, int]]]) -> dict[str, torch.Tensor]:
        rows = torch.cat([pixels[b, r : r + n] for _, (b, r, n) in missing])[None]
        row_mask = torch.cat([mask[b, r : r + n] for _, (b, r, n) in missing])[None] if mask is not None else None
        features = model.get_image_features(pixel_values=rows, pixel_attention_mask=row_mask, return_dict=True).pooler_output[0]
        features = features.view(rows.shape[1], -1, features.shape[-1])  # [rows, tokens per row, hidden]
        self.stats.tower_calls += 1
        out, start = {}, 0
        for key, (_, _, n) in missing:
            out[key] = features[start : start + n].clone()  # its own storage: the budget counts what it holds
            start += n
            self.put(key, out[key])
        self.stats.encoded += len(missing)
        return out
