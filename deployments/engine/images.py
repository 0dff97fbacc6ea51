"""Images in a request: base64 data URLs, checked at the edge and decoded in the engine.

`check_image_url` (the protocol layer, before a request reaches a model): it
must be a base64 data URL of a readable image within the size limits (else a
400). Only the header is decoded there (PIL reads sizes lazily); the bounds
keep one request from making a replica decode a decompression bomb.
`decode_image_url` (the engine, on a replica): the pixels, as RGB.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image

from deployments.engine.errors import InvalidRequest

# Encoded bytes of one image: a large photo as PNG fits, a raw dump does not.
MAX_IMAGE_BYTES = 8 * 1024 * 1024
# Pixels of one image: 4096 × 4096; vision towers resize to ~900 px anyway.
MAX_IMAGE_PIXELS = 4096 * 4096


def _base64_payload(url: str) -> str:
    """The base64 text of a data URL; ValueError naming the problem for anything else (no network)."""
    if not url.startswith("data:"):
        raise ValueError("image_url must be a data URL (data:image/png;base64,...); remote URLs are not fetched")
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise ValueError("image_url data URL must be base64-encoded (data:image/...;base64,...)")
    return payload


def check_image_url(url: str) -> str:
    """`url` unchanged if it is an acceptable image; ValueError naming the problem otherwise."""
    payload = _base64_payload(url)
    if len(payload) * 3 // 4 > MAX_IMAGE_BYTES:
        raise ValueError(f"image is over {MAX_IMAGE_BYTES} bytes")
    try:
        raw = base64.b64decode(payload, validate=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as image:
                width, height = image.size
                image.verify()  # structure and checksums, without decoding pixels
    except (binascii.Error, ValueError, OSError, SyntaxError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"image_url is not a readable image: {exc}") from exc
    except Image.DecompressionBombError as exc:
        raise ValueError(f"image is too large: {exc}") from exc
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"image is {width}×{height} pixels; the limit is {MAX_IMAGE_PIXELS} pixels")
    return url


def decode_image_url(url: str) -> Image.Image:
    """A `data:image/...;base64,...` URL as an RGB PIL image; InvalidRequest otherwise."""
    try:
        payload = _base64_payload(url)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    try:
        image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
        image.load()
    except (binascii.Error, ValueError, OSError) as exc:
        raise InvalidRequest(f"image_url is not a readable image: {exc}") from exc
    return image.convert("RGB")
