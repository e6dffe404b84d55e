"""Images going into a generation: decoding uploads within documented caps, masks, sizes, and putting the
original pixels back around an inpainted area.

Why the paste-back: an inpainted image goes through the VAE twice (encode, decode), which shifts colours and
softens detail everywhere, not only under the mask. Like AUTOMATIC1111's overlay, the studio composites the
original over the result with the feathered mask, so every pixel farther than the feather's reach from the mask is
exactly the input's.
"""

from __future__ import annotations

import io
import math

from PIL import Image, ImageFilter, UnidentifiedImageError

from studio.contract import InputError, require

MAX_INPUT_BYTES = 20 * 2**20  # an uploaded image file
MAX_INPUT_SIDE = 4096  # pixels, each side of an uploaded image (decoded, before it is fitted to the model)
MIN_SIZE = 64
SIZE_STEP = 8  # the VAE scales by 8
MAX_MASK_BLUR = 64  # pixels
FEATHER_REACH = 3  # a mask blurred with radius r changes pixels at most 3r away (PIL's Gaussian: about 2.5r + 1)


def open_image(field: str, data: bytes | Image.Image) -> Image.Image:
    """An uploaded image, decoded; refused (InputError naming `field`) when it is not an image, is damaged, or is
    larger than the caps. The size is checked from the header, before the pixels are decoded."""
    if isinstance(data, Image.Image):
        image = data
    else:
        require(isinstance(data, (bytes, bytearray)) and len(data) > 0, field, "is empty")
        require(len(data) <= MAX_INPUT_BYTES, field,
                f"is {len(data) / 2**20:.1f} MiB; the limit is {MAX_INPUT_BYTES // 2**20} MiB")
        try:
            image = Image.open(io.BytesIO(data))
        except (UnidentifiedImageError, OSError):
            raise InputError(field, "is not an image (PNG, JPEG or WebP expected)") from None
    width, height = image.size
    require(max(width, height) <= MAX_INPUT_SIDE, field,
            f"is {width}x{height} pixels; the limit is {MAX_INPUT_SIDE} pixels on each side")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise InputError(field, "is damaged or truncated and cannot be decoded") from None
    return image


def rgb(image: Image.Image) -> Image.Image:
    """The image as RGB; transparent parts become white, as most editors show them."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return image.convert("RGB")


def mask_of(image: Image.Image) -> Image.Image:
    """A mask as black and white ("L"): white (255) is repainted, black kept. Light pixels are white; a mask
    with transparency is read over black, so painted strokes on a transparent layer mark the area."""
    rgba = image.convert("RGBA")
    grey = Image.alpha_composite(Image.new("RGBA", rgba.size, "black"), rgba).convert("L")
    return grey.point(lambda v: 255 if v > 127 else 0)


def check_mask(mask: Image.Image, image: Image.Image) -> None:
    require(mask.size == image.size, "mask",
            f"is {mask.width}x{mask.height} pixels but the image is {image.width}x{image.height}; "
            "a mask must have the image's size")
    require(mask.getbbox() is not None, "mask", "is empty: paint the area to repaint (white on black)")


def fit(width: int, height: int, max_size: int | None) -> tuple[int, int]:
    """The size a model works at for an input of this size: scaled down to fit `max_size` (aspect kept), then
    rounded down to multiples of 8, at least 64."""
    scale = min(1.0, (max_size or max(width, height)) / max(width, height))
    return tuple(max(MIN_SIZE, int(side * scale) // SIZE_STEP * SIZE_STEP) for side in (width, height))


def scaled(width: int, height: int, scale: float) -> tuple[int, int]:
    """An upscale's output size: the input's times `scale`, to the nearest multiple of 8."""
    return tuple(max(MIN_SIZE, round(side * scale / SIZE_STEP) * SIZE_STEP) for side in (width, height))


def feather(mask: Image.Image, blur: int) -> Image.Image:
    """The mask's edge blurred by a Gaussian of radius `blur` pixels (0: a hard edge)."""
    return mask.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else mask


def feather_reach(blur: int) -> int:
    """How far outside the mask, in pixels, the feather can change a pixel."""
    return math.ceil(FEATHER_REACH * blur)


def paste_back(original: Image.Image, generated: Image.Image, feathered: Image.Image) -> Image.Image:
    """The generated image where the feathered mask is white, the original where it is black, blended between."""
    return Image.composite(generated.convert("RGB"), original.convert("RGB"), feathered)
