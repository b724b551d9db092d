"""Tiny Stable Diffusion components built from configs (nothing downloaded): diffusers' ``UNet2DConditionModel``,
``AutoencoderKL`` and ``DDIMScheduler`` and transformers' ``CLIPTextModel`` with a ``CLIPTokenizer`` read from a
small local vocab and merges file; and a tiny transformers Pix2Struct captioner (model + processor). Used by
``edit_speed.py``, ``examples/seed_system.py`` and the tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

WORDS = ["a", "red", "blue", "green", "circle", "square", "photo", "of"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


def clip_tokenizer(folder: Path, max_length: int = 16):
    """A ``CLIPTokenizer`` over bytes plus one merged token per word of ``WORDS``."""
    import transformers

    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges = []
    for word in WORDS:  # merge each word left to right into one token
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in vocab:
                vocab.append(pieces[0])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tokenizer.model_max_length = max_length
    return tokenizer


def tiny_stable_diffusion(folder: Path, layers_per_block: int = 1, seed: int = 0) -> dict[str, Any]:
    """``vae``, ``text_encoder``, ``tokenizer``, ``unet``, ``scheduler`` (Stable Diffusion's DDIM config); the VAE
    is 2x down, so a 64 px image has 32x32x4 latents."""
    import diffusers
    import transformers

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
    )
    tokenizer = clip_tokenizer(folder)
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
        )
    )
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    for module in (unet, vae, text_encoder):
        module.eval()
    return dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)


P2S_WORDS = "a an red blue green yellow square circle triangle above below left right of the to and two three"


def tiny_pix2struct_folder(path):
    """A Pix2Struct model and processor (word-level T5 tokenizer, 4x4 patches, 64 patches at most) saved to ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        Pix2StructConfig,
        Pix2StructForConditionalGeneration,
        Pix2StructProcessor,
        T5TokenizerFast,
    )
    from transformers.models.pix2struct.image_processing_pil_pix2struct import Pix2StructImageProcessorPil

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *P2S_WORDS.split()])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = T5TokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                extra_ids=0)  # fmt: skip
    processor = Pix2StructProcessor(
        Pix2StructImageProcessorPil(patch_size={"height": 4, "width": 4}, max_patches=64), tokenizer
    )
    torch.manual_seed(0)
    small = {"hidden_size": 32, "num_attention_heads": 2, "d_kv": 16, "d_ff": 64, "num_layers": 1}
    config = Pix2StructConfig(
        text_config={**small, "vocab_size": len(vocab), "num_layers": 1, "decoder_start_token_id": 0},
        vision_config={**small, "patch_embed_hidden_size": 48, "num_hidden_layers": 1},
    )
    model = Pix2StructForConditionalGeneration(config)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


def tiny_stable_diffusion_folder(path: Path, scheduler: str = "ddpm") -> Path:
    """The tiny components saved as a diffusers Stable Diffusion folder (``StableDiffusionPipeline.save_pretrained``,
    safetensors) with the seed's ``DDPMScheduler`` (or ``ddim``)."""
    import warnings

    import diffusers

    path = Path(path)
    parts = tiny_stable_diffusion(path / "clip")
    if scheduler == "ddpm":
        parts["scheduler"] = diffusers.DDPMScheduler.from_config(parts["scheduler"].config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = diffusers.StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    sd.save_pretrained(path / "sd", safe_serialization=True)
    return path / "sd"


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="write a tiny Stable Diffusion folder and a tiny Pix2Struct folder")
    parser.add_argument("--out", default="runs/tiny")
    out = Path(parser.parse_args().out)
    print(f"wrote {tiny_stable_diffusion_folder(out)} and {tiny_pix2struct_folder(out / 'pix2struct')}")
