"""Streamed data: tar shards and datasets' streaming=True; the order, resume, ranks, bad rows and training on them."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_data import coloured
from test_training import final_weights, tiny_model, tiny_run
from torch.utils.data import DataLoader

from cyclediffusion.images import preprocess_image
from cyclediffusion.training import DataOptions, train_text2image, train_vae
from cyclediffusion.training import streaming as streaming_module
from cyclediffusion.training.data import collate, load_images
from cyclediffusion.training.streaming import StreamedRows, TarStream, is_stream, open_stream, tar_shards


def add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def png(i: int) -> bytes:
    buffer = io.BytesIO()
    coloured(i).save(buffer, "PNG")
    return buffer.getvalue()


def write_shards(root: Path, shards: int = 3, per_shard: int = 8, json_every: int = 3) -> list[str]:
    """``shards`` tar files of ``per_shard`` samples (PNG + ``.txt``, every ``json_every``-th ``.json``);
    returns the captions, caption ``i`` belonging to image ``coloured(i)``."""
    root.mkdir(parents=True, exist_ok=True)
    captions = []
    for s in range(shards):
        with tarfile.open(root / f"{s:04d}.tar", "w") as archive:
            for j in range(per_shard):
                i = s * per_shard + j
                captions.append(f"caption {i}")
                add(archive, f"{i:05d}.png", png(i))
                if i % json_every == 0:
                    add(archive, f"{i:05d}.json", json.dumps({"text": f"caption {i}", "width": 12}).encode())
                else:
                    add(archive, f"{i:05d}.txt", f"caption {i}".encode())
    return captions


def batches(stream, count: int, batch_size: int = 4, **kw) -> list[list[str]]:
    """Captions of the first ``count`` batches of a stream's sampler."""
    sampler = iter(stream.batch_sampler(batch_size, **kw))
    return [[caption for _, _, caption in next(sampler)] for _ in range(count)]


def caption_of(raw) -> str:
    return raw if isinstance(raw, str) else json.loads(raw)["text"]


def test_tar_stream_covers_every_row_once_per_epoch_and_reshuffles(tmp_path):
    captions = write_shards(tmp_path / "shards", shards=5, per_shard=8)
    stream = open_stream(str(tmp_path / "shards"), 8)
    epochs = [[caption_of(c) for c in b] for b in batches(stream, 20, batch_size=4)]
    first, second = sum(epochs[:10], []), sum(epochs[10:], [])
    assert sorted(first) == sorted(captions) and sorted(second) == sorted(captions)
    assert first != second and first != captions  # shuffled, and again differently
    # shards are mixed: the first batches take rows of more than one shard
    shards_of_first = {int(c.split()[1]) // 8 for c in sum(epochs[:2], [])}
    assert len(shards_of_first) > 1
    again = [[caption_of(c) for c in b] for b in batches(open_stream(str(tmp_path / "shards"), 8), 20)]
    assert again == epochs
    other_seed = [[caption_of(c) for c in b] for b in batches(stream, 20, seed=1)]
    assert other_seed != epochs and sorted(sum(other_seed[:10], [])) == sorted(captions)


def test_tar_stream_resumes_at_the_step_and_ranks_split_the_global_batch(tmp_path):
    write_shards(tmp_path / "shards", shards=3, per_shard=8)
    stream = open_stream(str(tmp_path / "shards"), 8)
    straight = batches(stream, 12)
    resumed = iter(stream.batch_sampler(4, start_step=7))
    first = next(resumed)
    assert [c for _, _, c in first] == straight[7] and {step for step, _, _ in first} == {7}
    assert [c for _, _, c in next(resumed)] == straight[8]
    whole = batches(stream, 6, batch_size=8)
    ranks = [batches(stream, 6, batch_size=4, world_size=2, rank=r) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == whole


def test_first_batch_reads_only_the_first_mixed_shards(tmp_path, monkeypatch):
    """Time to the first step does not grow with the number of shards: only a few shards' headers are read."""
    write_shards(tmp_path / "shards", shards=40, per_shard=4)
    listed = []
    real = streaming_module.shard_rows
    monkeypatch.setattr(streaming_module, "shard_rows", lambda path: listed.append(path) or real(path))
    stream = open_stream(str(tmp_path / "shards"), 8)
    next(iter(stream.batch_sampler(4)))
    assert 1 <= len(listed) <= streaming_module.SHARDS_MIXED


def test_rows_decode_in_workers_and_bad_rows_are_replaced_within_the_batch(tmp_path, caplog):
    root = tmp_path / "shards"
    root.mkdir()
    with tarfile.open(root / "0000.tar", "w") as archive:
        for i in range(6):
            add(archive, f"{i}.png", b"not an image" if i == 2 else png(i))
            if i != 4:
                add(archive, f"{i}.txt", f"caption {i}".encode())
    stream = open_stream(str(root), 8)
    assert isinstance(stream.stream, TarStream)
    rows = StreamedRows(8)
    keys = next(iter(stream.batch_sampler(6)))
    items = rows.__getitems__(keys)
    by_caption = {item["caption"]: item for item in items}
    assert set(by_caption) <= {f"caption {i}" for i in (0, 1, 3, 5)} and len(items) == 6
    for caption, item in by_caption.items():
        i = int(caption.split()[1])
        assert torch.equal(item["pixels"], preprocess_image(coloured(i), 8))
    assert rows.skipped == {"not an image": 1, "empty caption": 1}
    again = rows.__getitems__(keys)
    assert [a["caption"] for a in again] == [b["caption"] for b in items]
    assert "not an image" in caplog.text
    loader = DataLoader(stream.rows, batch_sampler=stream.batch_sampler(3), num_workers=2, collate_fn=collate)
    in_workers = [b for _, b in zip(range(4), loader)]
    in_process = [collate(rows.__getitems__(k)) for _, k in zip(range(4), iter(stream.batch_sampler(3)))]
    for a, b in zip(in_workers, in_process):
        assert a["caption"] == b["caption"] and torch.equal(a["pixels"], b["pixels"])
        assert torch.equal(a["step"], b["step"])


def test_a_batch_with_no_readable_row_is_an_error(tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    with tarfile.open(root / "0000.tar", "w") as archive:
        for i in range(2):
            add(archive, f"{i}.png", b"broken")
            add(archive, f"{i}.txt", b"caption")
    stream = open_stream(str(root), 8)
    with pytest.raises(RuntimeError, match="no row of step 0 is readable"):
        stream.rows.__getitems__(next(iter(stream.batch_sampler(2))))


def test_captions_for_the_tokenizer_come_from_the_start_of_the_stream(tmp_path):
    captions = write_shards(tmp_path / "shards", shards=3, per_shard=8)
    stream = open_stream(str(tmp_path / "shards"), 8)
    assert stream.captions == captions


def test_hub_stream_through_datasets_is_ordered_by_seed_and_resumes(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "parquet"
    folder.mkdir()
    for part in range(2):
        rows = range(part * 10, part * 10 + 10)
        table = datasets.Dataset.from_dict({"image": [coloured(i) for i in rows], "text": [f"c{i}" for i in rows]})
        table.cast_column("image", datasets.Image()).to_parquet(str(folder / f"train-{part:05d}.parquet"))
    stream = open_stream(str(folder), 8, cache_dir=str(tmp_path / "cache"))
    assert not tar_shards(folder)
    straight = batches(stream, 8)
    assert sorted(sum(straight[:5], [])) == sorted(f"c{i}" for i in range(20))
    assert sum(straight[:5], []) != [f"c{i}" for i in range(20)]
    resumed = iter(stream.batch_sampler(4, start_step=6))
    assert [c for _, _, c in next(resumed)] == straight[6]
    item = stream.rows.__getitems__(next(iter(stream.batch_sampler(1))))[0]
    i = int(item["caption"][1:])
    assert torch.equal(item["pixels"], preprocess_image(coloured(i), 8))
    assert stream.captions == [f"c{i}" for i in range(20)]
    with pytest.raises(ValueError, match="no column 'caption'"):
        open_stream(str(folder), 8, caption_column="caption")


def test_streaming_option_reads_an_imagefolder_through_datasets(tmp_path):
    pytest.importorskip("datasets")
    from test_data import write_folder

    root = write_folder(tmp_path / "data", [f"c{i}" for i in range(6)])
    stream = load_images(DataOptions(data=str(root), image_size=8, streaming=True))
    items = stream.rows.__getitems__(next(iter(stream.batch_sampler(6))))
    assert sorted(item["caption"] for item in items) == [f"c{i}" for i in range(6)]


def test_stream_options_that_need_the_whole_dataset_are_refused(tmp_path):
    write_shards(tmp_path / "shards", shards=2, per_shard=8)
    for bad in ({"subset_size": 4}, {"cache_latents": True}):
        with pytest.raises(ValueError, match="does not work with a stream"):
            load_images(DataOptions(data=str(tmp_path / "shards"), image_size=8, **bad))
    data = DataOptions(data=str(tmp_path / "shards"), image_size=16)
    with pytest.raises(ValueError, match="--epochs needs a dataset of known size"):
        train_text2image(data, tiny_run(tmp_path / "run", steps=None, epochs=1), tiny_model())


def test_training_on_tar_shards_resumes_exactly(tmp_path):
    """A run on streamed shards (with a bad row) resumed halfway ends with the weights of an uninterrupted one."""
    root = tmp_path / "shards"
    write_shards(root, shards=3, per_shard=8)
    with tarfile.open(root / "0003.tar", "w") as archive:
        add(archive, "bad.png", b"not an image")
        add(archive, "bad.txt", b"a broken row")
    data = DataOptions(data=str(root), image_size=16)
    straight = train_text2image(data, tiny_run(tmp_path / "a", steps=4, ema_decay=0), tiny_model())
    train_text2image(data, tiny_run(tmp_path / "b", steps=2, ema_decay=0), tiny_model())
    train_text2image(data, tiny_run(tmp_path / "b", steps=4, ema_decay=0), tiny_model())
    a, b = final_weights(straight.parent), final_weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)
    vocabulary = json.loads((tmp_path / "a" / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert any("caption" in token for token in vocabulary)  # the tokenizer learnt the stream's captions


def test_vae_trains_on_a_stream_and_measures_its_scaling_on_the_first_rows(tmp_path):
    write_shards(tmp_path / "shards", shards=2, per_shard=8)
    data = DataOptions(data=str(tmp_path / "shards"), image_size=16)
    from cyclediffusion.training import RunOptions, VAEOptions

    run = RunOptions(out=str(tmp_path / "vae"), steps=2, batch_size=4, warmup=1, progress=False, precision="32")
    model = train_vae(data, run, VAEOptions(size="tiny", downsample=4))
    config = json.loads((model / "config.json").read_text())
    assert config["scaling_factor"] > 0 and config["scaling_factor"] != 1.0


def test_image_is_png_decoded_not_resized_twice():
    """The decoded stream item is the same preprocessing as the map-style data (one resize to the size)."""
    image = Image.open(io.BytesIO(png(3)))
    assert torch.equal(StreamedRows(8).decode(png(3), "c")[0]["pixels"], preprocess_image(image, 8))


def test_what_is_read_as_a_stream(tmp_path, monkeypatch):
    """Shards, one shard and ``--streaming`` stream; an imagefolder with its metadata is not even listed for shards."""
    from test_data import write_folder

    write_shards(tmp_path / "shards", shards=2, per_shard=2)
    folder = write_folder(tmp_path / "images", ["a", "b"])
    (folder / "stray.tar").write_bytes((tmp_path / "shards" / "0000.tar").read_bytes())
    assert is_stream(str(tmp_path / "shards")) and is_stream(str(tmp_path / "shards" / "0001.tar"))
    assert is_stream(str(folder), streaming=True) and not is_stream("someone/captions")
    monkeypatch.setattr(Path, "glob", lambda *a, **k: pytest.fail("an imagefolder was listed for shards"))
    assert not is_stream(str(folder))
