"""Captioned images read as a stream: folders of tar shards (WebDataset layout) and ``datasets`` with streaming=True.

Nothing is scanned before the first step. The main process walks the stream's *rows* (undecoded image bytes and raw
captions) in an order that is a pure function of ``(seed, epoch)``; step ``k`` takes global rows ``[k G, (k+1) G)``
(``G`` = batch size x world size) and rank ``r`` its slice of them, as :class:`~.sampler.StepBatchSampler` does for
map-style data, so a resumed run, or a run on more processes, sees the same global batches. The loader's workers
decode and check the rows (:class:`StreamedRows`); a row without a readable image or a caption is counted and
replaced by the next good row of its batch, so the replacement too is the same on resume.

Tar shards: ``0001.jpg`` + ``0001.txt`` (or ``0001.json`` with the caption column) share a key, as in WebDataset.
Each epoch shuffles the shard order and mixes :data:`SHARDS_MIXED` shards at a time in a shuffled order of their
rows; only the members' headers of those shards are read to do so, and the rows other ranks take are never read.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Sampler

from ..images import uint8_to_float
from .data import METADATA_FILES, _caption, _try_decode
from .tokenizers import TOKENIZER_SAMPLE

logger = logging.getLogger("cyclediffusion")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
CAPTION_EXTENSIONS = ("txt", "json")
SHARDS_MIXED = 4  # shards whose rows are shuffled together
SHUFFLE_BUFFER = 1000  # rows of datasets' own shuffle buffer (hub streams)
WARN_FIRST = 10  # bad rows warned about one by one per process; later ones every WARN_EVERY
WARN_EVERY = 1000


def tar_shards(source: str | Path) -> list[Path]:
    """The ``.tar`` shards of a folder (sorted), or ``[source]`` for one ``.tar`` file; ``[]`` if neither."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".tar":
        return [path]
    return sorted(path.glob("*.tar")) if path.is_dir() else []


def is_stream(source: str, streaming: bool = False) -> bool:
    """Whether ``--data`` is read as a stream: asked for, one ``.tar`` file, or a folder of shards without the
    imagefolder's metadata (the folder is listed only then, not for every big imagefolder)."""
    path = Path(source).expanduser()
    if streaming or (path.is_file() and path.suffix == ".tar"):
        return True
    if not path.is_dir() or any((path / name).is_file() for name in METADATA_FILES):
        return False
    return next(path.glob("*.tar"), None) is not None


@dataclass(frozen=True)
class Member:
    """Where one tar member's data lies."""

    path: str
    offset: int
    size: int
    extension: str

    def read(self, files: dict[str, Any]) -> bytes:
        """The member's bytes, read through ``files`` (open handles by path, reused)."""
        handle = files.get(self.path)
        if handle is None:
            handle = files[self.path] = open(self.path, "rb")  # noqa: SIM115 - kept open for the next rows
        handle.seek(self.offset)
        return handle.read(self.size)


@dataclass(frozen=True)
class TarRow:
    """One sample of a shard: its image member and caption member (either may be missing)."""

    image: Member | None
    caption: Member | None

    def load(self, files: dict[str, Any]) -> tuple[Any, Any]:
        """``(image bytes or None, caption text or json bytes or None)``."""
        image = self.image.read(files) if self.image else None
        if self.caption is None:
            return image, None
        text = self.caption.read(files)
        return image, (text if self.caption.extension == "json" else text.decode("utf-8", "replace"))


def shard_rows(path: Path) -> list[TarRow]:
    """The samples of one shard in file order, from its members' headers alone (no data is read)."""
    samples: dict[str, dict[str, Member]] = {}
    with tarfile.open(path, "r:") as archive:
        for info in archive:
            if not info.isfile():
                continue
            folder, base = os.path.split(info.name)
            stem, dot, extension = base.partition(".")
            if not dot or stem.startswith("."):
                continue
            member = Member(str(path), info.offset_data, info.size, extension.lower())
            samples.setdefault(os.path.join(folder, stem), {})[member.extension] = member
    rows = []
    for members in samples.values():
        image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        caption = next((members[e] for e in CAPTION_EXTENSIONS if e in members), None)
        rows.append(TarRow(image, caption))
    return rows


class TarStream:
    """The rows of tar shards, epoch after epoch, in an order drawn from ``(seed, epoch)``."""

    def __init__(self, shards: Sequence[Path], caption_column: str = "text", mixed: int = SHARDS_MIXED) -> None:
        if not shards:
            raise ValueError("no .tar shards to read")
        self.shards, self.caption_column, self.mixed = list(shards), caption_column, max(1, mixed)
        self.files: dict[str, Any] = {}

    def epoch(self, seed: int, epoch: int) -> Iterator[TarRow]:
        rng = np.random.default_rng([seed, epoch])
        order = [self.shards[i] for i in rng.permutation(len(self.shards))]
        for start in range(0, len(order), self.mixed):
            rows = [row for shard in order[start : start + self.mixed] for row in shard_rows(shard)]
            yield from (rows[i] for i in rng.permutation(len(rows)))

    def rows(self, seed: int) -> Iterator[TarRow]:
        """Every row of every epoch; the first epoch without rows ends the stream with an error."""
        epoch = 0
        while True:
            empty = True
            for row in self.epoch(seed, epoch):
                empty = False
                yield row
            if empty:
                raise ValueError(f"the tar shards ({self.shards[0].parent}) hold no samples")
            epoch += 1

    def load(self, row: TarRow) -> tuple[Any, Any]:
        return row.load(self.files)

    def captions(self, limit: int) -> list[str]:
        """Up to ``limit`` captions from the first shards in file order (for the tokenizer)."""
        found: list[str] = []
        for row in (row for shard in self.shards for row in shard_rows(shard) if row.caption is not None):
            text = caption_text(row.load(self.files)[1], self.caption_column)
            if text:
                found.append(text)
            if len(found) >= limit:
                break
        return found


class TableStream:
    """The rows of a ``datasets.IterableDataset`` (images not decoded), reshuffled each epoch with ``set_epoch``."""

    def __init__(self, table: Any, image_column: str, caption_column: str) -> None:
        self.table, self.columns = table, (image_column, caption_column)

    def rows(self, seed: int) -> Iterator[tuple[Any, Any]]:
        shuffled = self.table.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)
        epoch = 0
        while True:
            shuffled.set_epoch(epoch)
            empty = True
            for row in shuffled:
                empty = False
                yield row[self.columns[0]], row[self.columns[1]]
            if empty:
                raise ValueError("the streamed dataset holds no rows")
            epoch += 1

    @staticmethod
    def load(row: tuple[Any, Any]) -> tuple[Any, Any]:
        return row

    def captions(self, limit: int) -> list[str]:
        """Up to ``limit`` captions from the start of the (unshuffled) stream (for the tokenizer)."""
        found = []
        for row in self.table.select_columns([self.columns[1]]):
            text = caption_text(row[self.columns[1]], self.columns[1])
            if text:
                found.append(text)
            if len(found) >= limit:
                break
        return found


def caption_text(value: Any, column: str) -> str | None:
    """A caption from a string, a list of strings or a json document (``column``, else ``caption`` / ``text``)."""
    if isinstance(value, (bytes, bytearray)):
        try:
            document = json.loads(value)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(document, dict):
            return None
        value = next((document[k] for k in (column, "caption", "text") if k in document), None)
    return _caption(value)


class StreamBatchSampler(Sampler[list[tuple[int, Any, Any]]]):
    """Endless batches of ``(step, image, caption)`` rows: step ``k`` takes global rows ``[k G, (k+1) G)``.

    It runs in the main process: rows of other ranks are passed over without being read, rows of this rank are
    loaded (bytes, not decoded) and handed to the loader's workers. ``start_step`` skips ``start_step x G`` rows.
    """

    def __init__(
        self, stream: Any, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0, start_step: int = 0
    ) -> None:
        self.stream, self.batch_size, self.world_size, self.rank = stream, batch_size, world_size, rank
        self.seed, self.start_step = seed, start_step

    def __iter__(self) -> Iterator[list[tuple[int, Any, Any]]]:
        rows = self.stream.rows(self.seed)
        size, mine = self.batch_size, range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for _ in range(self.start_step * size * self.world_size):
            next(rows)
        step = self.start_step
        while True:
            batch = []
            for i in range(size * self.world_size):
                row = next(rows)
                if i in mine:
                    batch.append((step, *self.stream.load(row)))
            yield batch
            step += 1


class StreamedRows(Dataset):
    """Decodes the rows a :class:`StreamBatchSampler` hands out; items as :class:`~.data.CaptionedImages`' plus
    ``step``. A bad row (no or unreadable image, no caption) is counted in :attr:`skipped` (of the worker that met
    it) and replaced by the next good row of the same batch."""

    def __init__(self, image_size: int, caption_column: str = "text") -> None:
        self.image_size, self.caption_column = image_size, caption_column
        self.skipped: Counter[str] = Counter()

    def decode(self, image: Any, caption: Any) -> tuple[dict[str, Any] | None, str | None]:
        text = caption_text(caption, self.caption_column)
        if text is None:
            return None, "empty caption"
        if image is None:
            return None, "missing file"
        array, reason = _try_decode(image, self.image_size)
        return (None, reason) if reason else ({"pixels": uint8_to_float(array), "caption": text}, None)

    def __getitem__(self, key: tuple[int, Any, Any]) -> dict[str, Any]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, Any, Any]]) -> list[dict[str, Any]]:
        decoded = []
        for step, image, caption in keys:
            item, reason = self.decode(image, caption)
            if reason:
                self.skipped[reason] += 1
                total = sum(self.skipped.values())
                if total <= WARN_FIRST or total % WARN_EVERY == 0:
                    logger.warning("data: %s in a row of step %d (%d bad rows met here so far)", reason, step, total)
            decoded.append(item)
        good = [i for i, item in enumerate(decoded) if item is not None]
        if not good:
            raise RuntimeError(f"data: no row of step {keys[0][0]} is readable ({dict(self.skipped)} so far)")
        items = []
        for i, (step, _, _) in enumerate(keys):
            j = i if decoded[i] is not None else next((g for g in good if g > i), good[0])
            items.append({**decoded[j], "step": step})
        return items


class CaptionedStream:
    """Captioned images read as a stream (see the module): what training needs of a dataset whose length and rows
    are not known before it is read."""

    def __init__(self, stream: TarStream | TableStream, image_size: int, caption_column: str, name: str) -> None:
        self.stream, self.image_size, self.name = stream, image_size, name
        self.rows = StreamedRows(image_size, caption_column)
        self._captions: list[str] | None = None

    @property
    def captions(self) -> list[str]:
        """Up to :data:`~.tokenizers.TOKENIZER_SAMPLE` captions from the start of the stream (for the tokenizer);
        read once, when first asked for."""
        if self._captions is None:
            self._captions = self.stream.captions(TOKENIZER_SAMPLE)
            if not self._captions:
                raise ValueError(f"data: no caption found at the start of {self.name}")
        return self._captions

    def batch_sampler(
        self, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0, start_step: int = 0
    ) -> StreamBatchSampler:
        """Step-keyed batches of this rank (see :class:`StreamBatchSampler`)."""
        return StreamBatchSampler(self.stream, batch_size, world_size, rank, seed, start_step)

    def first_items(self, count: int) -> list[dict[str, Any]]:
        """The first ``count`` good items of the stream (for measurements such as the VAE's latent scaling)."""
        sampler = iter(self.batch_sampler(count))
        return self.rows.__getitems__(next(sampler))


def open_stream(
    source: str,
    image_size: int,
    *,
    split: str = "train",
    cache_dir: str | None = None,
    caption_column: str = "text",
    image_column: str = "image",
) -> CaptionedStream:
    """``source`` as a stream: a folder of ``.tar`` shards (or one ``.tar``), else ``datasets.load_dataset`` with
    ``streaming=True`` (a hub name, a local folder of data files or an imagefolder, a ``.parquet`` file)."""
    shards = tar_shards(source)
    if shards:
        logger.info("data: %d tar shards in %s, read as a stream", len(shards), source)
        return CaptionedStream(TarStream(shards, caption_column), image_size, caption_column, source)
    import datasets

    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".parquet":
            raise ValueError(f"{source}: a stream reads a folder, a .tar shard, a .parquet file or a hub dataset")
        table = datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True)
    else:
        name = str(path) if path.exists() else source
        table = datasets.load_dataset(name, split=split, cache_dir=cache_dir, streaming=True)
    columns = table.column_names or list(table.features or {})
    missing = [c for c in (image_column, caption_column) if columns and c not in columns]
    if missing:
        raise ValueError(
            f"{source} has no column {', '.join(map(repr, missing))}; its columns are {columns} "
            "(see --image-column and --caption-column)"
        )
    table = table.select_columns([image_column, caption_column])
    if table.features is not None and isinstance(table.features[image_column], datasets.Image):
        table = table.cast_column(image_column, datasets.Image(decode=False))
    logger.info("data: %s streamed through datasets (%d shards)", source, table.num_shards)
    return CaptionedStream(TableStream(table, image_column, caption_column), image_size, caption_column, source)
