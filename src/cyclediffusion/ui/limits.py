"""What one request to the web UI may ask for, and the checks that turn bad input into one clear message.

The limits are options (declared once: the dataclass field is the ``serve`` flag); the checks raise
:class:`InputError`, which the app shows in the page instead of a stack trace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

from ..options import option


class InputError(ValueError):
    """Input a request may not have: the message is for the person at the page."""


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for, and how many run at once."""

    max_upload_mb: float = option(10.0, "largest file an upload may be, in MB")
    max_pixels: int = option(1024 * 1024, "most pixels (width x height) of an uploaded image")
    max_steps: int = option(200, "most sampler steps a request may ask for")
    max_images: int = option(8, "most images one request may make")
    concurrency: int = option(1, "requests computed at once (the others wait in the queue)")
    queue_size: int = option(16, "requests that may wait in the queue")

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_steps", "max_images", "concurrency", "queue_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_upload_mb <= 0:
            raise ValueError(f"max_upload_mb must be positive, got {self.max_upload_mb}")

    def check_count(self, name: str, value: Any, most: int) -> int:
        """``value`` as a whole number in [1, most], or an :class:`InputError` naming ``name``."""
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise InputError(f"{name} must be a number, got {value!r}") from None
        if number != int(number) or not 1 <= number <= most:
            raise InputError(f"{name} must be a whole number from 1 to {most}, got {value}")
        return int(number)

    def steps(self, value: Any) -> int:
        return self.check_count("steps", value, self.max_steps)

    def images(self, value: Any) -> int:
        return self.check_count("number of images", value, self.max_images)

    def image(self, image: Image.Image | None, what: str = "image") -> Image.Image:
        """The uploaded image as RGB, after checking it is there and not too large."""
        if image is None:
            raise InputError(f"upload an {what} first")
        if image.width * image.height > self.max_pixels:
            raise InputError(
                f"the {what} is {image.width}x{image.height} = {image.width * image.height} pixels; "
                f"at most {self.max_pixels} are allowed"
            )
        return image.convert("RGB")


def check_prompt(tokenizer: Any, text: str | None, what: str = "prompt", required: bool = True) -> str:
    """``text`` stripped, after checking that it is given (when ``required``) and fits the tokenizer's length."""
    text = (text or "").strip()
    if required and not text:
        raise InputError(f"the {what} is empty")
    count, most = tokenizer.count_tokens(text), tokenizer.max_length
    if count > most:
        raise InputError(f"the {what} is {count} tokens long; the model reads at most {most} (start and end included)")
    return text


def check_number(name: str, value: Any, low: float, high: float | None = None, above: bool = False) -> float:
    """``value`` as a float in [low, high] (``above``: strictly above ``low``), or an :class:`InputError`."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None
    if (number <= low if above else number < low) or (high is not None and number > high):
        bound = f"above {low}" if above else f"at least {low}"
        raise InputError(f"{name} must be {bound}{'' if high is None else f' and at most {high}'}, got {value}")
    return number
