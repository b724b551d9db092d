"""Data loading: preprocessing, imagefolder and hub-style datasets, bad files, workers, latent cache."""

from __future__ import annotations

import io
import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cyclediffusion.images import preprocess_image
from cyclediffusion.models.vae import AutoencoderKL, VAEConfig
from cyclediffusion.training.data import CaptionedImages, collate, load_captioned_images
from cyclediffusion.training.latents import (
    CachedLatents,
    encode_latent_parameters,
    load_latent_cache,
    save_latent_cache,
)

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)]


def coloured(i: int, size: tuple[int, int] = (12, 10)) -> Image.Image:
    """A distinct small image per index: a colour with a gradient so that no two are equal."""
    image = np.zeros((size[1], size[0], 3), np.uint8)
    image[:] = COLOURS[i % len(COLOURS)]
    image[0, :, :] = (i * 7) % 256
    return Image.fromarray(image)


def write_folder(root: Path, captions: list[str], column: str = "text", fmt: str = "jsonl", sub: str = "") -> Path:
    """An imagefolder: PNGs (in ``sub``) and a metadata file naming them; returns the folder."""
    (root / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    for i, caption in enumerate(captions):
        name = f"{sub}/{i:03d}.png" if sub else f"{i:03d}.png"
        coloured(i).save(root / name)
        rows.append({"file_name": name, column: caption})
    if fmt == "jsonl":
        (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        lines = [f"file_name,{column}"] + [f'{row["file_name"]},"{row[column]}"' for row in rows]
        (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


# --- preprocessing -------------------------------------------------------------------------------


def test_short_side_resize_and_centre_crop():
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, :10] = (255, 0, 0)
    image[:, 10:30] = (0, 255, 0)
    image[:, 30:] = (0, 0, 255)
    x = preprocess_image(Image.fromarray(image), 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    green = (x[1] > 0.5) & (x[0] < -0.5) & (x[2] < -0.5)
    assert green.float().mean() > 0.9  # the red and blue quarters are cropped away
    tall = preprocess_image(Image.fromarray(image.transpose(1, 0, 2).copy()), 8)  # 20 wide, 40 high
    assert tall.shape == (3, 8, 8) and (tall[1] > 0.5).float().mean() > 0.9


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (9, 7), 128),
        Image.new("1", (9, 7), 1),
        Image.new("RGBA", (9, 7), (255, 0, 0, 0)),
        Image.new("LA", (9, 7), (0, 0)),
        Image.new("P", (9, 7), 3),
        Image.new("CMYK", (9, 7), (0, 0, 0, 0)),
        Image.fromarray(np.full((7, 9), 65535, np.uint16)),
    ],
    ids=["L", "1", "RGBA", "LA", "P", "CMYK", "I;16"],
)
def test_any_mode_becomes_rgb(image):
    x = preprocess_image(image, 6)
    assert x.shape == (3, 6, 6) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1


def test_range_white_black_transparency_and_16_bit():
    assert torch.equal(preprocess_image(Image.new("RGB", (5, 5), "white"), 4), torch.ones(3, 4, 4))
    assert torch.equal(preprocess_image(Image.new("RGB", (5, 5), "black"), 4), -torch.ones(3, 4, 4))
    assert torch.equal(preprocess_image(Image.new("RGBA", (5, 5), (0, 0, 0, 0)), 4), torch.ones(3, 4, 4))
    palette = Image.new("P", (5, 5), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert torch.equal(preprocess_image(palette, 4), torch.ones(3, 4, 4))  # transparent -> white
    grey16 = preprocess_image(Image.fromarray(np.full((5, 5), 128 * 257, np.uint16)), 4)  # 16-bit mid grey
    assert torch.equal(grey16, preprocess_image(Image.new("RGB", (5, 5), (128, 128, 128)), 4))
    noise = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    x = preprocess_image(Image.fromarray(noise), 16)
    assert x.min() >= -1 and x.max() <= 1


def test_jpeg_decoded_at_reduced_scale_matches_full_decode(tmp_path):
    image = Image.fromarray(np.kron(np.eye(8, dtype=np.uint8) * 255, np.ones((40, 40), np.uint8))).convert("RGB")
    image.save(tmp_path / "a.jpg", quality=95)
    data = load_captioned_images(str(write_jpeg_folder(tmp_path)), 16)
    reference = preprocess_image(Image.open(tmp_path / "a.jpg"), 16)
    assert (data[0]["pixels"] - reference).abs().mean() < 0.05


def write_jpeg_folder(tmp_path: Path) -> Path:
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.jpg", "text": "diagonal"}) + "\n")
    return tmp_path


# --- local folders -------------------------------------------------------------------------------


def test_imagefolder_jsonl(tmp_path):
    captions = ["a red square", "a green circle", "a blue triangle"]
    data = load_captioned_images(str(write_folder(tmp_path, captions)), 8)
    assert len(data) == 3 and data.captions == captions and data.image_size == 8 and not data.skipped
    item = data[1]
    assert item["caption"] == "a green circle" and item["pixels"].shape == (3, 8, 8)
    assert torch.equal(item["pixels"], preprocess_image(coloured(1), 8))
    assert torch.equal(data[-1]["pixels"], data[2]["pixels"])
    with pytest.raises(IndexError):
        data[3]


def test_imagefolder_csv_custom_column_and_subfolders(tmp_path):
    captions = ["one, with a comma", "two", "three"]
    data = load_captioned_images(
        str(write_folder(tmp_path, captions, "caption", "csv", "imgs/a")), 8, caption_column="caption"
    )
    assert data.captions == captions and len(data) == 3
    with pytest.raises(ValueError, match="'text'"):
        load_captioned_images(str(tmp_path), 8)  # the default caption column is absent


def test_imagefolder_split_subfolder(tmp_path):
    write_folder(tmp_path / "train", ["a", "b"])
    write_folder(tmp_path / "test", ["c"])
    assert load_captioned_images(str(tmp_path), 8).captions == ["a", "b"]
    assert load_captioned_images(str(tmp_path), 8, split="test").captions == ["c"]


def test_bad_rows_skipped_and_counted(tmp_path, caplog):
    root = write_folder(tmp_path, ["good 0", "good 1", "good 2", "good 3"])
    whole = png_bytes(coloured(9, (64, 64)))
    (root / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (root / "text.png").write_text("not an image at all")
    coloured(5).save(root / "blank.png")
    extra = [
        {"file_name": "truncated.png", "text": "truncated"},
        {"file_name": "text.png", "text": "text file"},
        {"file_name": "missing.png", "text": "missing"},
        {"file_name": "blank.png", "text": "   "},
        {"file_name": "blank.png"},
        {"text": "no file name"},
    ]
    with (root / "metadata.jsonl").open("a") as f:
        f.write("".join(json.dumps(row) + "\n" for row in extra) + "{not json\n\n")
    with caplog.at_level(logging.INFO, logger="cyclediffusion"):
        data = load_captioned_images(str(root), 8)
    assert len(data) == 4 and data.captions == ["good 0", "good 1", "good 2", "good 3"]
    expected = {
        "unreadable image": 1,
        "not an image": 1,
        "missing file": 2,
        "empty caption": 2,
        "bad metadata line": 1,
    }
    assert dict(data.skipped) == expected
    assert "data: 4 images" in caplog.text and "skipped 7 (2 missing file, 2 empty caption" in caplog.text
    lazy = load_captioned_images(str(root), 8, memory_budget=0)  # same checks when decoding lazily
    assert len(lazy) == 4 and lazy.skipped == data.skipped
    assert all(torch.equal(lazy[i]["pixels"], data[i]["pixels"]) for i in range(4))


def test_unchecked_data_decodes_nothing_up_front_and_replaces_bad_images_when_met(tmp_path, monkeypatch):
    root = write_folder(tmp_path, ["good 0", "good 1", "good 2", "good 3"])
    (root / "text.png").write_text("not an image at all")
    extra = [{"file_name": "text.png", "text": "text file"}, {"file_name": "missing.png", "text": "missing"},
             {"file_name": "000.png", "text": " "}, {"text": "no file name"}]  # fmt: skip
    with (root / "metadata.jsonl").open("a") as f:
        f.write("".join(json.dumps(row) + "\n" for row in extra))
    import cyclediffusion.training.data as data_module

    decoded = []
    real = data_module._try_decode
    monkeypatch.setattr(data_module, "_try_decode", lambda *a: decoded.append(a[0]) or real(*a))
    data = load_captioned_images(str(root), 8, check=False)
    assert decoded == []  # nothing read before the first item is asked for
    assert len(data) == 6 and data.captions[-2:] == ["text file", "missing"]
    assert dict(data.skipped) == {"empty caption": 1, "missing file": 1}
    checked = load_captioned_images(str(root), 8)
    item = data[4]  # text.png, then missing.png, are bad: the next good item is the first
    assert item["caption"] == "good 0" and torch.equal(item["pixels"], checked[0]["pixels"])
    assert torch.equal(data[2]["pixels"], checked[2]["pixels"])
    assert data.skipped["not an image"] == 1 and data.skipped["missing file"] == 2


def test_lazy_item_that_went_bad_falls_back_to_the_next(tmp_path):
    root = write_folder(tmp_path, ["a", "b", "c"])
    data = load_captioned_images(str(root), 8, memory_budget=0)
    (root / "001.png").write_text("corrupted after the scan")
    assert data[1]["caption"] == "c" and torch.equal(data[1]["pixels"], data[2]["pixels"])


def test_subset_size(tmp_path):
    captions = [f"caption {i}" for i in range(10)]
    root = write_folder(tmp_path, captions)
    assert load_captioned_images(str(root), 8, subset_size=4).captions == captions[:4]
    assert len(load_captioned_images(str(root), 8, subset_size=0)) == 10
    assert len(load_captioned_images(str(root), 8, subset_size=50)) == 10
    shuffled = load_captioned_images(str(root), 8, subset_size=4, shuffle_subset=True, seed=1).captions
    assert shuffled == load_captioned_images(str(root), 8, subset_size=4, shuffle_subset=True, seed=1).captions
    assert shuffled != captions[:4] and set(shuffled) <= set(captions)
    (root / "000.png").unlink()  # a bad row is replaced by the next good one
    data = load_captioned_images(str(root), 8, subset_size=4)
    assert data.captions == captions[1:5] and data.skipped == {"missing file": 1}


def test_small_subset_past_many_bad_rows(tmp_path):
    root = write_folder(tmp_path, [f"c{i}" for i in range(40)])
    for i in range(30):
        (root / f"{i:03d}.png").unlink()
    data = load_captioned_images(str(root / "metadata.jsonl"), 8, subset_size=3)  # the file itself works too
    assert data.captions == ["c30", "c31", "c32"] and data.skipped == {"missing file": 30}


def test_folder_without_metadata_is_refused(tmp_path):
    coloured(0).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"no metadata\.jsonl or metadata\.csv.*file_name"):
        load_captioned_images(str(tmp_path), 8)


def test_all_rows_bad_is_an_error(tmp_path):
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "x"}) + "\n")
    with pytest.raises(ValueError, match="0 images.*1 missing file"):
        load_captioned_images(str(tmp_path), 8)


@pytest.mark.parametrize("name", ["./nope", "{tmp}/nope", "a/b/nope", "here/nope"])
def test_missing_path_is_file_not_found(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()  # "here/nope" could be a hub id, but "here" is a local folder
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load_captioned_images(name.format(tmp=tmp_path), 8)


def test_dataset_from_images_in_memory():
    images = [coloured(0), {"bytes": png_bytes(coloured(1))}, png_bytes(coloured(2)), {"bytes": b"junk"}]
    data = CaptionedImages(images, ["a", ["", "b"], "c", "d"], 8)
    assert data.captions == ["a", "b", "c"] and data.skipped == {"not an image": 1}
    assert torch.equal(data[2]["pixels"], preprocess_image(coloured(2), 8))
    assert pickle.loads(pickle.dumps(data)).captions == data.captions


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# --- hub-style datasets --------------------------------------------------------------------------


def test_saved_hub_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [coloured(i) for i in range(5)]
    texts = ["zero", "one", "", "three", "four"]
    datasets.Dataset.from_dict({"image": images, "text": texts, "other": list(range(5))}).cast_column(
        "image", datasets.Image()
    ).save_to_disk(str(tmp_path / "ds"))
    data = load_captioned_images(str(tmp_path / "ds"), 8)
    assert data.captions == ["zero", "one", "three", "four"] and data.skipped == {"empty caption": 1}
    assert torch.equal(data[2]["pixels"], preprocess_image(coloured(3), 8))
    lazy = load_captioned_images(str(tmp_path / "ds"), 8, subset_size=2, memory_budget=0)
    assert lazy.captions == ["zero", "one"] and torch.equal(lazy[1]["pixels"], data[1]["pixels"])
    assert pickle.loads(pickle.dumps(lazy))[1]["caption"] == "one"
    with pytest.raises(ValueError, match=r"no column 'caption'.*'image', 'text', 'other'"):
        load_captioned_images(str(tmp_path / "ds"), 8, caption_column="caption")


def test_saved_dataset_dict_with_caption_lists(tmp_path):
    datasets = pytest.importorskip("datasets")
    train = datasets.Dataset.from_dict(
        {"img": [coloured(i) for i in range(3)], "sentences": [["", "first"], ["second", "2nd"], ["  ", ""]]}
    )
    datasets.DatasetDict({"validation": train}).save_to_disk(str(tmp_path / "dd"))
    data = load_captioned_images(
        str(tmp_path / "dd"), 8, split="validation", caption_column="sentences", image_column="img"
    )
    assert data.captions == ["first", "second"] and data.skipped == {"empty caption": 1}
    with pytest.raises(ValueError, match="no split 'train'"):
        load_captioned_images(str(tmp_path / "dd"), 8, caption_column="sentences", image_column="img")


def test_hub_name_goes_to_load_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({"image": [coloured(i) for i in range(4)], "caption": list("abcd")})
    calls = []

    def fake_load_dataset(name, split=None, cache_dir=None):
        calls.append((name, split, cache_dir))
        return table.cast_column("image", datasets.Image())

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_captioned_images("someone/captions", 8, "val", "/tmp/hf", 2, caption_column="caption")
    assert calls == [("someone/captions", "val", "/tmp/hf")] and data.captions == ["a", "b"]


def test_local_parquet_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({"image": [coloured(i) for i in range(3)], "text": ["a", "b", "c"]})
    (tmp_path / "data").mkdir()
    table.cast_column("image", datasets.Image()).to_parquet(str(tmp_path / "data" / "train-00000.parquet"))
    data = load_captioned_images(str(tmp_path), 8, cache_dir=str(tmp_path / "cache"))
    assert data.captions == ["a", "b", "c"] and torch.equal(data[0]["pixels"], preprocess_image(coloured(0), 8))


# --- loaders and latents ---------------------------------------------------------------------------


@pytest.mark.parametrize("memory_budget", [2**30, 0], ids=["in-memory", "lazy"])
def test_dataloader_workers_give_identical_batches(tmp_path, memory_budget):
    data = load_captioned_images(
        str(write_folder(tmp_path, [f"c{i}" for i in range(10)])), 8, memory_budget=memory_budget
    )
    batches = [list(DataLoader(data, batch_size=4, num_workers=w, collate_fn=collate)) for w in (0, 2)]
    assert len(batches[0]) == len(batches[1]) == 3
    for a, b in zip(*batches):
        assert torch.equal(a["pixels"], b["pixels"]) and a["caption"] == b["caption"]
    assert batches[0][0]["pixels"].shape == (4, 3, 8, 8) and batches[0][2]["caption"] == ["c8", "c9"]


def test_collate_passes_ints_and_lists():
    items = [
        {"x": torch.ones(2), "caption": "a", "step": 3},
        {"x": torch.zeros(2), "caption": "b", "step": 4},
    ]
    batch = collate(items)
    assert batch["x"].shape == (2, 2) and batch["caption"] == ["a", "b"]
    assert batch["step"].dtype == torch.long and batch["step"].tolist() == [3, 4]


def test_latent_cache_round_trip(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(block_channels=(8, 16), layers_per_block=1, norm_groups=4))
    vae.train()
    data = load_captioned_images(str(write_folder(tmp_path / "d", [f"c{i}" for i in range(5)])), 8)
    parameters = encode_latent_parameters(data, vae, batch_size=2)
    assert parameters.shape == (5, 8, 4, 4) and parameters.dtype == torch.float32 and vae.training
    with torch.no_grad():
        posterior = vae.eval().encode(torch.stack([data[i]["pixels"] for i in range(5)]))
    torch.testing.assert_close(parameters[:, :4], posterior.mean)
    torch.testing.assert_close(parameters, posterior.parameters)
    meta = {"vae": "abc123", "image_size": 8, "source": "d"}
    save_latent_cache(tmp_path / "cache" / "latents.safetensors", parameters, data.captions, meta)
    loaded, captions, loaded_meta = load_latent_cache(tmp_path / "cache" / "latents.safetensors")
    assert torch.equal(loaded, parameters) and captions == data.captions and loaded_meta == meta
    cached = CachedLatents(loaded, captions)
    batch = collate([cached[i] for i in range(3)])
    assert batch["latent_params"].shape == (3, 8, 4, 4) and batch["caption"] == ["c0", "c1", "c2"]
    with pytest.raises(ValueError):
        CachedLatents(loaded, captions[:2])
