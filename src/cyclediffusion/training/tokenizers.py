"""The tokenizer of a run: trained on its captions, reused when it resumes, or copied from another model."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from ..pipelines.storage import resolve_model_dir
from ..text import TOKENIZER_NAME, Tokenizer
from .options import CaptionerOptions

TOKENIZER_SAMPLE = 50_000  # captions the BPE merges are learnt from (evenly spaced over bigger datasets)
LONGEST_PROBED = 5_000  # over TOKENIZER_SAMPLE captions, the longest in characters set the token length


def prepare_tokenizer(out: Path, captions: list[str], vocab_size: int, max_length: int | None) -> Tokenizer:
    """Train the BPE tokenizer on the captions (or reload the run's own, when resuming).

    Without ``max_length`` the token length fits the longest caption (a multiple of 8, at most 77). The merges
    are learnt from at most :data:`TOKENIZER_SAMPLE` captions, evenly spaced, and beyond that many the token
    length is measured on the :data:`LONGEST_PROBED` longest captions in characters, so that a dataset of millions
    of rows does not hold up the first step.
    """
    path = out / "tokenizer"
    if (path / TOKENIZER_NAME).is_file():
        return Tokenizer.from_pretrained(path)
    sample = captions[:: math.ceil(len(captions) / TOKENIZER_SAMPLE)]  # all of them up to TOKENIZER_SAMPLE
    tokenizer = Tokenizer.train(sample, vocab_size=vocab_size, max_length=max_length or 77)
    if max_length is None:  # the merges do not depend on the length: measure, then set it
        longest_texts = (
            sorted(set(captions), key=len)[-LONGEST_PROBED:] if len(captions) > TOKENIZER_SAMPLE else captions
        )
        backend = tokenizer.backend
        backend.no_truncation(), backend.no_padding()  # one batched pass over whole captions
        longest = max(len(encoding.ids) for encoding in backend.encode_batch(longest_texts))
        config = dataclasses.replace(tokenizer.config, max_length=min(77, 8 * math.ceil(longest / 8)))
        tokenizer = Tokenizer(config, backend)  # configures truncation and padding at the measured length
    tokenizer.save_pretrained(path)
    return tokenizer


def find_tokenizer(path: str | Path) -> Path:
    """A tokenizer folder: ``path`` itself, or the ``tokenizer/`` of ``path`` or of ``path/model``."""
    return resolve_model_dir(path, TOKENIZER_NAME, component="tokenizer")


def captioner_tokenizer(out: Path, captions: list[str], options: CaptionerOptions) -> Tokenizer:
    """The run's tokenizer: a copy of ``options.tokenizer``, or one trained on the captions.

    A resumed run must keep the tokenizer it started with: a different ``--tokenizer`` is refused.
    """
    if not options.tokenizer:
        return prepare_tokenizer(out, captions, options.vocab_size, options.max_length)
    if options.max_length is not None:
        raise ValueError("--max-length comes with the tokenizer given by --tokenizer: drop one of them")
    tokenizer = Tokenizer.from_pretrained(find_tokenizer(options.tokenizer))
    own = out / "tokenizer"
    if (own / TOKENIZER_NAME).is_file():
        previous = Tokenizer.from_pretrained(own)
        if previous.backend.to_str() != tokenizer.backend.to_str() or previous.config != tokenizer.config:
            raise ValueError(f"{out} was started with another tokenizer than {options.tokenizer}; use a new --out")
    tokenizer.save_pretrained(own)
    return tokenizer
