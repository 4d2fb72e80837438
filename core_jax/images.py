"""Decoding image files into RGB arrays, and SigLIP's image preprocessing.

Decoding conventions (one for every caller):
- EXIF orientation is applied, so the pixels are upright as a viewer shows
  them.
- Transparency (RGBA, LA, PA, palette or grey/RGB images with a transparent
  colour) is composited over a white background, `BACKGROUND`.
- 16-bit images are scaled to 8 bits, never clipped: grey ones as
  `round(v * 255 / 65535)`; colour ones as Pillow decodes them, keeping the
  high byte (`v // 256`, within one level of the former). 32-bit float
  images are read as values in [0, 1] (values outside are clipped).
- CMYK images (mostly JPEGs) are converted through their embedded ICC profile
  when they carry one, else with Pillow's CMYK conversion (which undoes the
  inversion Adobe writes into CMYK JPEGs).
- Animated GIF/PNG/WebP and multi-page TIFF: the first frame only.
- Grey images become RGB by repeating the grey level.
- Only the photographic formats of `IMAGE_FORMATS` are opened; a file in any
  other format (EPS, PDF, FITS...) is "not an image".

A file that cannot become an image raises `ImageError` (a `ValueError`) whose
message names the file and the reason: missing, empty, not an image,
truncated, or larger than the pixel limit. The pixel limit is checked per
call on the size the header declares, before any pixel is decoded, so a tiny
file declaring a gigantic image (a "decompression bomb") costs nothing;
Pillow's global `Image.MAX_IMAGE_PIXELS` is never changed. Pillow's own
bomb check, at twice that global, still applies, so `max_pixels` above about
179 million pixels has no effect.

Preprocessing follows big_vision's SigLIP evaluation (`resize(size)` then
`value_range(-1, 1)`): a bilinear resize of the whole image to (size, size)
(no crop, aspect ratio not kept) with half-pixel centres and no antialiasing,
then `x / 127.5 - 1`. `antialias=True` gives Pillow's antialiased bilinear
filter instead (the one torchvision and transformers use), which is kinder to
large downscales but does not match big_vision's numbers.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
from collections.abc import Sequence

import numpy as np
from absl import logging
from PIL import Image, ImageCms, ImageOps

BACKGROUND = (255, 255, 255)

# The formats `load` opens. Others that Pillow knows are refused: EPS would run
# Ghostscript on untrusted bytes, and the scientific and vector formats are no
# photographs.
IMAGE_FORMATS = (
    "JPEG",
    "PNG",
    "GIF",
    "WEBP",
    "TIFF",
    "BMP",
    "PPM",
    "TGA",
    "JPEG2000",
    "AVIF",
    "ICO",
    "PCX",
    "QOI",
)
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's default limit (a 0.25 GiB RGBA image).

_TRANSPARENT_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageError(ValueError):
    """An image file is missing, empty, unreadable, truncated or too large."""


def load(
    path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decodes one image file.

    Args:
      path: the image file.
      max_pixels: largest width * height accepted; larger images raise
        `ImageError` without being decoded.

    Returns:
      uint8 (H, W, 3) RGB pixels, upright, see the module docstring.

    Raises:
      ImageError: the file is missing, empty, not an image, truncated, or
        declares more than `max_pixels` pixels.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as error:
        raise ImageError(f"{path}: cannot read image file ({error.strerror})") from None
    if os.path.isdir(path):
        raise ImageError(f"{path}: is a directory, expected an image file")
    if size == 0:
        raise ImageError(f"{path}: empty file (0 bytes), expected an image")

    try:
        with Image.open(path, formats=_available_formats()) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(
                    f"{path}: declares {width}x{height} = {width * height} pixels, "
                    f"more than the limit of {max_pixels} (possible "
                    "decompression bomb); not decoded"
                )
            image.seek(0)
            image.load()
            return _to_rgb(_upright(image, path))
    except ImageError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageError(f"{path}: decompression bomb refused ({error})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(
            f"{path}: not an image file in a readable format "
            f"({', '.join(_available_formats())})"
        ) from None
    except (PermissionError, FileNotFoundError, IsADirectoryError) as error:
        raise ImageError(f"{path}: cannot read image file ({error.strerror})") from None
    except OSError as error:
        # Pillow reports truncated or corrupt pixel data as OSError.
        raise ImageError(f"{path}: truncated or corrupt image ({error})") from None
    except Exception as error:  # noqa: BLE001
        # Decoders of untrusted bytes fail with many exception types
        # (SyntaxError, struct.error, EOFError, ValueError...); each is a bad
        # file, not a bug in the caller.
        raise ImageError(
            f"{path}: cannot decode image ({type(error).__name__}: {error})"
        ) from None


def _available_formats() -> list[str]:
    Image.init()
    return [name for name in IMAGE_FORMATS if name in Image.OPEN]


def _upright(image: Image.Image, path: str) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception as error:  # noqa: BLE001
        # A malformed EXIF block should not cost the image itself.
        logging.warning("%s: EXIF orientation ignored (%s)", path, error)
        return image


def _to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode

    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        grey = np.round(np.clip(values, 0, 65535) * (255 / 65535)).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        grey = np.round(np.clip(np.nan_to_num(values), 0, 1) * 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if mode == "CMYK":
        return np.asarray(_cmyk_to_rgb(image), dtype=np.uint8).copy()

    if mode in _TRANSPARENT_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    profile = image.info.get("icc_profile")
    if profile:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            target = ImageCms.createProfile("sRGB")
            return ImageCms.profileToProfile(image, source, target, outputMode="RGB")
        except Exception as error:  # noqa: BLE001
            logging.warning(
                "CMYK ICC profile unusable (%s); using the plain conversion", error
            )
    return image.convert("RGB")


def resize(image: np.ndarray, size: int, *, antialias: bool = False) -> np.ndarray:
    """Bilinear resize of one image to (size, size), as floats.

    Args:
      image: uint8 or float (H, W, C).
      size: output height and width.
      antialias: False: half-pixel-centre bilinear interpolation between the
        two nearest pixels, edges clamped (big_vision, `tf.image.resize`).
        True: Pillow's triangle filter widened by the downscale factor.

    Returns:
      float32 (size, size, C) in the input's value range.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"expected an (H, W, C) image, got shape {image.shape}")
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    if antialias:
        channels = [
            np.asarray(
                Image.fromarray(image[..., c].astype(np.float32), mode="F").resize(
                    (size, size), Image.Resampling.BILINEAR
                )
            )
            for c in range(image.shape[-1])
        ]
        return np.stack(channels, axis=-1).astype(np.float32)

    # Rows are gathered before conversion to float, so a large image is never
    # copied whole as float32.
    rows = _interpolate_axis(image, size, axis=0)
    return _interpolate_axis(rows, size, axis=1)


def _interpolate_axis(image: np.ndarray, size: int, axis: int) -> np.ndarray:
    length = image.shape[axis]
    centres = (np.arange(size, dtype=np.float64) + 0.5) * (length / size) - 0.5
    centres = np.clip(centres, 0, length - 1)
    lower = np.floor(centres).astype(np.int64)
    upper = np.minimum(lower + 1, length - 1)
    weight = (centres - lower).astype(np.float32)
    shape = [1] * image.ndim
    shape[axis] = size
    weight = weight.reshape(shape)
    low = np.take(image, lower, axis=axis).astype(np.float32)
    high = np.take(image, upper, axis=axis).astype(np.float32)
    return low + (high - low) * weight


def preprocess(
    images: Sequence[np.ndarray], size: int, *, antialias: bool = False
) -> np.ndarray:
    """SigLIP's image preprocessing for a batch.

    Args:
      images: N uint8 (H_i, W_i, 3) arrays, sizes may differ.
      size: the model's image size.
      antialias: see `resize`.

    Returns:
      float32 (N, size, size, 3) in [-1, 1].
    """
    out = np.empty((len(images), size, size, 3), dtype=np.float32)
    for i, image in enumerate(images):
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(
                f"images[{i}]: expected uint8 (H, W, 3), got {image.dtype} "
                f"{image.shape}"
            )
        out[i] = _to_unit_range(resize(image, size, antialias=antialias))
    return out


def _to_unit_range(pixels: np.ndarray) -> np.ndarray:
    return np.clip(pixels / np.float32(127.5) - np.float32(1), -1, 1)


def load_batch(
    paths: Sequence[str | os.PathLike],
    size: int,
    *,
    on_error: str = "skip",
    workers: int = 8,
    antialias: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Decodes and preprocesses image files in parallel threads.

    Each image is resized in the thread that decoded it, so at most `workers`
    full-size images are held at once.

    Args:
      paths: N image files.
      size: the model's image size.
      on_error: "skip": a bad file is logged, counted in `skipped` and left
        out; "raise": the first bad file (in path order) raises `ImageError`.
      workers: decoding threads (Pillow releases the GIL while decoding).
      antialias: see `resize`.
      max_pixels: see `load`.

    Returns:
      images: float32 (K, size, size, 3) in [-1, 1], K <= N.
      kept: int64 (K,), the index into `paths` of each returned image.
      skipped: (path, reason) for each of the N - K files left out.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")

    def work(path):
        pixels = resize(load(path, max_pixels=max_pixels), size, antialias=antialias)
        return _to_unit_range(pixels)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(work, path) for path in paths]
        results = []
        for future in futures:
            try:
                results.append(future.result())
            except ImageError as error:
                if on_error == "raise":
                    for pending in futures:
                        pending.cancel()
                    raise
                results.append(error)

    kept, arrays, skipped = [], [], []
    for i, (path, result) in enumerate(zip(paths, results, strict=True)):
        if isinstance(result, ImageError):
            skipped.append((os.fspath(path), str(result)))
            logging.warning("Skipped image: %s", result)
        else:
            kept.append(i)
            arrays.append(result)
    if skipped:
        logging.warning("Skipped %d of %d images", len(skipped), len(paths))

    stacked = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.float32)
    return stacked, np.asarray(kept, dtype=np.int64), skipped
