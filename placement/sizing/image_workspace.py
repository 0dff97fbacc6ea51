"""Bytes the images of one request hold on the device (deployments.engine: image requests take a side slot).

Per image, measured on the MedGemma 4B shapes (SigLIP, 896 px, patch 14 →
4096 patches, hidden 1152, MLP 4304; CPU, sdpa attention):

- its `pixel_values` in the model's dtype, for the whole generate call:
  3 × 896² × 2 B = 4.6 MiB;
- the vision tower's peak while it encodes the image: 108,265,472 B
  (103 MiB) = patches × (4 × hidden + 2 × intermediate) × 2 B, the same with
  2 or 4 layers (one layer's activations live at a time); sdpa never holds
  the patches² attention matrix (eager attention would: 1.5 GiB more);
- the projected image features kept for the call: tokens per image × text
  hidden × 2 B (256 × 2560 × 2 = 1.25 MiB).

A request may carry at most `max_images` images (the replica plan's cap, a 400
above it); the tower encodes them together, so all of it is charged per image.
One side slot takes image requests, so one request's images are held at a time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Images per request when the spec does not say (vLLM's `limit_mm_per_prompt` plays this part).
DEFAULT_MAX_IMAGES = 4
_CHANNELS = 3


@dataclass(frozen=True)
class ImageWorkspace:
    """The device bytes of `max_images` images of one request, in a `dtype_bytes` model."""

    image_size: int
    patch_size: int
    vision_hidden: int
    vision_intermediate: int
    tokens_per_image: int
    text_hidden: int
    dtype_bytes: int
    max_images: int

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def per_image_bytes(self) -> int:
        pixels = _CHANNELS * self.image_size**2 * self.dtype_bytes
        tower = self.patches * (4 * self.vision_hidden + 2 * self.vision_intermediate) * self.dtype_bytes
        features = self.tokens_per_image * self.text_hidden * self.dtype_bytes
        return pixels + tower + features

    @property
    def total_bytes(self) -> int:
        return self.max_images * self.per_image_bytes

    def describe(self) -> str:
        return (
            f"images {self.total_bytes / 2**20:.1f} MiB: {self.max_images} per request × "
            f"{self.per_image_bytes / 2**20:.1f} MiB (pixels, vision tower over {self.patches} patches, features)"
        )


def image_workspace(config: Mapping[str, Any], *, dtype_bytes: int, max_images: int) -> ImageWorkspace | None:
    """The workspace of an image+text config (its `vision_config`), None for a text-only one."""
    vision = config.get("vision_config")
    if not vision:
        return None
    vision = dict(vision) if isinstance(vision, Mapping) else vision.to_dict()
    text = config.get("text_config") or {}
    text = dict(text) if isinstance(text, Mapping) else text.to_dict()
    return ImageWorkspace(
        image_size=int(vision.get("image_size", 224)),
        patch_size=int(vision.get("patch_size", 16)),
        vision_hidden=int(vision.get("hidden_size", 768)),
        vision_intermediate=int(vision.get("intermediate_size", 3072)),
        tokens_per_image=int(config.get("mm_tokens_per_image") or 256),
        text_hidden=int(text.get("hidden_size") or config.get("hidden_size") or 0),
        dtype_bytes=dtype_bytes,
        max_images=max_images,
    )
