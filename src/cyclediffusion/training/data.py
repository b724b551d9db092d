"""Captioned images for training: local ``imagefolder`` folders and hub datasets.

:func:`load_captioned_images` turns ``--data`` into a :class:`CaptionedImages` (``pixels`` and ``caption``);
:mod:`~cyclediffusion.training.latents` swaps the pixels for cached VAE posterior parameters.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..images import square_uint8, uint8_to_float
from ..progress import progress
from .options import DataOptions

if TYPE_CHECKING:
    from .streaming import CaptionedStream

logger = logging.getLogger("cyclediffusion")

MEMORY_BUDGET = 2 * 1024**3  # bytes of uint8 pixels kept in memory; bigger datasets are decoded lazily
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
LONG_JOB = 1000  # items: longer jobs show a progress bar
_CHUNK = 256  # rows decoded per batch of the load-time scan
_WORKERS = min(4, os.cpu_count() or 1)  # PIL releases the GIL while decoding and resizing


def _decode(value: Any, size: int | None) -> np.ndarray | None:
    """Decode an image (path, bytes, ``{"bytes", "path"}`` dict or PIL image); its pixels if ``size``."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        value = io.BytesIO(value)
    if value is None:
        raise FileNotFoundError("no image file given")
    with nullcontext(value) if isinstance(value, Image.Image) else Image.open(value) as image:
        if size and image.format == "JPEG":  # decode at a reduced scale that still covers `size`
            scale = size / min(image.size)
            image.draft(None, (math.ceil(image.width * scale), math.ceil(image.height * scale)))
        image.load()
        return square_uint8(image, size) if size else None


def _try_decode(value: Any, size: int | None) -> tuple[np.ndarray | None, str | None]:
    """``(pixels or None, None)`` if the image decodes, else ``(None, reason)``."""
    try:
        return _decode(value, size), None
    except FileNotFoundError:
        return None, "missing file"
    except UnidentifiedImageError:
        return None, "not an image"
    except Image.DecompressionBombError:
        return None, "image too large"
    except (OSError, ValueError, SyntaxError, EOFError):
        return None, "unreadable image"


def _caption(value: Any) -> str | None:
    """The stripped caption, the first non-empty one of a list, or None if there is none."""
    if isinstance(value, (list, tuple)):
        value = next((v for v in value if isinstance(v, str) and v.strip()), None)
    return value.strip() if isinstance(value, str) and value.strip() else None


class CaptionedImages(Dataset):
    """Images with captions; items are ``{"pixels": (3, S, S) float32 in [-1, 1], "caption": str}``.

    Every image is decoded once here: rows with a missing, unreadable or non-image file or without a
    caption are dropped and counted in :attr:`skipped`. The first ``subset_size`` usable rows are kept
    (all if 0 or None). Their preprocessed uint8 pixels stay in memory when they fit in ``memory_budget``
    bytes; otherwise images are decoded again in ``__getitem__``, where a file that has gone bad since
    falls back to the next good item. With ``check=False`` nothing is decoded up front (rows without an image or
    a caption are still dropped): the first step no longer waits for a scan of the whole dataset, and a bad image
    is met, counted in :attr:`skipped` (of the process that read it) and replaced by the next good one in
    ``__getitem__``, deterministically, so a resumed run still sees the same batches.

    ``images`` holds paths, bytes, ``{"bytes", "path"}`` dicts, PIL images, or row numbers into ``table``
    (a ``datasets.Dataset`` whose ``image_column`` is not decoded); ``captions`` holds strings or lists of
    strings, of which the first non-empty one is used.
    """

    def __init__(
        self,
        images: Sequence[Any],
        captions: Sequence[Any],
        image_size: int,
        *,
        subset_size: int | None = None,
        table: Any = None,
        image_column: str = "image",
        memory_budget: int = MEMORY_BUDGET,
        skipped: Counter[str] | None = None,
        name: str = "data",
        check: bool = True,
    ) -> None:
        if image_size < 1 or len(images) != len(captions):
            raise ValueError(f"need image_size >= 1 and one caption per image, got {image_size}")
        self.image_size = image_size
        self.skipped: Counter[str] = Counter(skipped or {})
        self.captions: list[str] = []
        self._table, self._column = table, image_column
        limit = min(subset_size, len(images)) if subset_size else len(images)
        if not check:
            self._index_unchecked(images, captions, limit, name)
            return
        in_memory = limit * 3 * image_size**2 <= memory_budget
        pixels = np.empty((limit, 3, image_size, image_size), np.uint8) if in_memory else None
        kept = []
        bar = progress(total=limit, desc=f"checking images in {name}", unit="img", enabled=limit > LONG_JOB)
        chunk = min(_CHUNK, max(limit, 16))  # small subsets decode little beyond what they keep
        with ThreadPoolExecutor(_WORKERS) as pool:
            for start in range(0, len(images), chunk):
                if len(kept) >= limit:
                    break
                rows = range(start, min(start + chunk, len(images)))
                texts = [_caption(captions[i]) for i in rows]
                todo = [i for i, text in zip(rows, texts) if text is not None]
                values = self._values([images[i] for i in todo])
                size = image_size if in_memory else None
                decoded = dict(zip(todo, pool.map(_try_decode, values, [size] * len(todo))))
                for i, text in zip(rows, texts):
                    if len(kept) >= limit:
                        break
                    array, reason = decoded.get(i, (None, "empty caption"))
                    if reason is not None:
                        self.skipped[reason] += 1
                        continue
                    if pixels is not None:
                        pixels[len(kept)] = array
                    kept.append(images[i])
                    self.captions.append(text)
                bar.update(len(rows))
        bar.close()
        self._pixels = None if pixels is None else pixels[: len(kept)]
        self._images = None if in_memory else kept
        if in_memory:
            self._table = None
        total = sum(self.skipped.values())
        reasons = ", ".join(f"{count} {reason}" for reason, count in self.skipped.most_common())
        summary = f"data: {len(kept)} images from {name}" + (f", skipped {total} ({reasons})" if total else "")
        if not kept:
            raise ValueError(f"{summary}: nothing to train on")
        logger.info(summary + ("" if in_memory else " (too many to keep in memory: decoded on the fly)"))

    def _index_unchecked(self, images: Sequence[Any], captions: Sequence[Any], limit: int, name: str) -> None:
        """Keep the rows that have an image and a caption without decoding anything (``check=False``): images
        are decoded, and bad ones replaced by the next good one, as they are read."""
        kept: list[Any] = []
        for image, caption in zip(images, captions):
            if len(kept) >= limit:
                break
            text = _caption(caption)
            reason = "empty caption" if text is None else "missing file" if image is None else None
            if reason:
                self.skipped[reason] += 1
                continue
            kept.append(image)
            self.captions.append(text)
        if not kept:
            raise ValueError(f"data: no row of {name} has both an image and a caption: nothing to train on")
        self._pixels, self._images = None, kept
        logger.info(f"data: {len(kept)} rows from {name} (images checked as they are read)")

    def _values(self, entries: list[Any]) -> list[Any]:
        """Image values for entries: themselves, or the rows they number in the table."""
        if self._table is None or not entries:
            return entries
        return list(self._table[entries][self._column])

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        if self._pixels is not None:
            return {"pixels": uint8_to_float(self._pixels[index]), "caption": self.captions[index]}
        for offset in range(n):
            j = (index + offset) % n
            array, reason = _try_decode(self._values([self._images[j]])[0], self.image_size)
            if reason is None:
                return {"pixels": uint8_to_float(array), "caption": self.captions[j]}
            self.skipped[reason] += 1
            logger.warning("data: %s for item %d (%s); using the next item", reason, j, self._images[j])
        raise RuntimeError("data: no readable image is left")


def _looks_like_path(source: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; other names, and ``dir/...`` if ``dir`` exists, are paths."""
    if source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1:
        return True
    return "/" in source and Path(source.split("/")[0]).is_dir()


def _is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _find_metadata(root: Path, split: str) -> Path | None:
    for folder in (root, root / split):
        for name in METADATA_FILES:
            if (folder / name).is_file():
                return folder / name
    return None


def _read_imagefolder(meta: Path, caption_column: str) -> tuple[list[str | None], list[Any], Counter[str]]:
    """Image paths, raw captions and skipped-line counts from an imagefolder metadata file."""
    rows, skipped = [], Counter()
    with meta.open(newline="", encoding="utf-8-sig") as f:
        if meta.suffix == ".csv":
            rows = list(csv.DictReader(f))
        for line in f if meta.suffix == ".jsonl" else ():
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if isinstance(row, dict):
                    rows.append(row)
                else:
                    skipped["bad metadata line"] += 1
    for column in ("file_name", caption_column):
        if rows and not any(column in row for row in rows):
            raise ValueError(f"{meta} has no {column!r} column (it has {sorted(rows[0])}); see --caption-column")
    parent = str(meta.parent)  # os.path.join: pathlib costs seconds over a million rows
    images = [os.path.join(parent, row["file_name"]) if row.get("file_name") else None for row in rows]
    return images, [row.get(caption_column) for row in rows], skipped


def _load_table(source: str, path: Path, split: str, cache_dir: str | None, columns: tuple[str, str]) -> Any:
    """A ``datasets.Dataset`` with just the image and caption columns, images left undecoded."""
    import datasets

    if _is_saved_dataset(path):
        table = datasets.load_from_disk(str(path))
        if isinstance(table, datasets.DatasetDict):
            if split not in table:
                raise ValueError(f"{source} has no split {split!r}; it has {list(table)}")
            table = table[split]
    elif path.is_file():
        if path.suffix != ".parquet":
            raise ValueError(f"{source}: expected a folder, a metadata.jsonl/csv or a .parquet file")
        table = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=cache_dir)
    else:
        table = datasets.load_dataset(str(path) if path.exists() else source, split=split, cache_dir=cache_dir)
    missing = [column for column in columns if column not in table.column_names]
    if missing:
        raise ValueError(
            f"{source} has no column {', '.join(map(repr, missing))}; its columns are {table.column_names} "
            "(see --image-column and --caption-column)"
        )
    table = table.select_columns(list(columns))
    if isinstance(table.features[columns[0]], datasets.Image):
        table = table.cast_column(columns[0], datasets.Image(decode=False))
    return table


def load_captioned_images(
    source: str,
    image_size: int,
    split: str = "train",
    cache_dir: str | None = None,
    subset_size: int | None = None,
    caption_column: str = "text",
    image_column: str = "image",
    *,
    shuffle_subset: bool = False,
    seed: int = 0,
    memory_budget: int = MEMORY_BUDGET,
    check: bool = True,
) -> CaptionedImages:
    """Captioned images from ``--data``: a local folder or a hub dataset name.

    A folder holds images and a ``metadata.jsonl`` or ``metadata.csv`` (``file_name`` relative to it, and
    ``caption_column``), directly or in ``source/split``; a folder written by ``save_to_disk``, a folder or
    file of parquet data, or a hub name goes through ``datasets``. ``subset_size`` keeps the first usable
    rows, after a shuffle by ``seed`` if ``shuffle_subset``. ``check=False`` decodes nothing here (see
    :class:`CaptionedImages`).
    """
    path = Path(source).expanduser()
    table, skipped = None, Counter()
    meta = _find_metadata(path, split) if path.is_dir() else path if path.name in METADATA_FILES else None
    if meta is not None and meta.is_file():
        images, captions, skipped = _read_imagefolder(meta, caption_column)
    elif path.is_dir() and not _is_saved_dataset(path) and not any(path.rglob("*.parquet")):
        raise ValueError(
            f"{source} has no metadata.jsonl or metadata.csv. Expected the imagefolder layout: images plus a "
            f'metadata.jsonl with one line per image like {{"file_name": "0001.png", "{caption_column}": '
            '"a red circle"}} (or a metadata.csv with those columns), or a folder saved with save_to_disk.'
        )
    elif path.exists() or not _looks_like_path(source):
        table = _load_table(source, path, split, cache_dir, (image_column, caption_column))
        images, captions = list(range(len(table))), list(table[caption_column])
    else:
        raise FileNotFoundError(f"data {source!r}: no such file or directory")
    if subset_size and shuffle_subset:
        order = np.random.default_rng(seed).permutation(len(images))
        images, captions = [images[i] for i in order], [captions[i] for i in order]
    return CaptionedImages(
        images, captions, image_size, subset_size=subset_size, table=table, image_column=image_column,
        memory_budget=memory_budget, skipped=skipped, name=source, check=check,
    )  # fmt: skip


def load_images(data: DataOptions) -> CaptionedImages | CaptionedStream:
    """:func:`load_captioned_images` of a run's :class:`~.options.DataOptions`, or with ``data.streaming`` (or
    a folder of tar shards) the :class:`~.streaming.CaptionedStream` of :func:`~.streaming.open_stream`."""
    from .streaming import is_stream, open_stream

    if is_stream(data.data, data.streaming):
        for given, why in ((data.subset_size, "--subset-size"), (data.cache_latents, "--cache-latents")):
            if given:
                raise ValueError(f"{why} needs the whole dataset before training; it does not work with a stream")
        return open_stream(
            data.data, data.image_size, split=data.split, cache_dir=data.cache_dir,
            caption_column=data.caption_column, image_column=data.image_column,
        )  # fmt: skip
    return load_captioned_images(
        data.data,
        data.image_size,
        split=data.split,
        cache_dir=data.cache_dir,
        subset_size=data.subset_size or None,
        caption_column=data.caption_column,
        image_column=data.image_column,
        check=data.check_images,
    )


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch: tensors stacked, ints as a LongTensor, floats as a float tensor, anything else as a list."""
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], (int, np.integer)) and not isinstance(values[0], bool):
            batch[key] = torch.tensor(values, dtype=torch.long)
        elif isinstance(values[0], float):
            batch[key] = torch.tensor(values, dtype=torch.float32)
        else:
            batch[key] = values
    return batch
