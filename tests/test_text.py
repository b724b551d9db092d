"""Tokenizer and text encoder: fixed-length ids, special tokens, truncation, eos pooling, save/load."""

from __future__ import annotations

import itertools

import pytest
import torch

from cyclediffusion.models.text_encoder import TextEncoder, TextEncoderConfig
from cyclediffusion.text import Tokenizer, TokenizerConfig

SIZES = ["small", "big", "tiny"]
COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]
PLACES = ["on the left", "on the right", "at the top", "in the middle"]
CAPTIONS = [
    f"a {s} {c} {shape} {p}"
    for (s, c, shape), p in zip(itertools.product(SIZES, COLOURS, SHAPES), itertools.cycle(PLACES))
][:30] + ["A Big RED Circle next to a small blue square"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(CAPTIONS, vocab_size=400, max_length=16)


def tiny_encoder(tokenizer: Tokenizer, **overrides) -> TextEncoder:
    torch.manual_seed(0)
    config = TextEncoderConfig(
        vocab_size=tokenizer.vocab_size,
        max_length=tokenizer.max_length,
        width=32,
        layers=2,
        heads=4,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return TextEncoder(config).eval()


def test_special_ids_and_vocab(tokenizer: Tokenizer) -> None:
    assert tokenizer.pad_token_id == 0
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3
    assert 259 <= tokenizer.vocab_size <= 400
    assert tokenizer.config.vocab_size == tokenizer.vocab_size
    assert tokenizer.max_length == 16


def test_ids_layout(tokenizer: Tokenizer) -> None:
    out = tokenizer(["a small red circle on the left", "a big blue square"])
    assert out.input_ids.shape == (2, 16) and out.input_ids.dtype == torch.long
    assert out.attention_mask.shape == (2, 16)
    for row, mask in zip(out.input_ids, out.attention_mask):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()
        assert row[0] == tokenizer.bos_token_id
        assert row[n - 1] == tokenizer.eos_token_id
        assert (row[n:] == tokenizer.pad_token_id).all()
        assert (row[1 : n - 1] > 2).all()
    # a single string is a batch of one
    assert tokenizer("a red circle").input_ids.shape == (1, 16)


def test_trained_merges_make_tokens_short(tokenizer: Tokenizer) -> None:
    n = int(tokenizer("a small red circle on the left").attention_mask.sum())
    assert n <= 9  # bos + about one token per word + eos


def test_empty_prompt(tokenizer: Tokenizer) -> None:
    ids = tokenizer("").input_ids[0]
    assert ids[:2].tolist() == [tokenizer.bos_token_id, tokenizer.eos_token_id]
    assert (ids[2:] == tokenizer.pad_token_id).all()
    assert tokenizer.decode(ids) == ""


def test_truncation_keeps_eos(tokenizer: Tokenizer) -> None:
    long = " ".join(CAPTIONS[:5])
    out = tokenizer(long)
    assert out.attention_mask.all()
    assert out.input_ids[0, 0] == tokenizer.bos_token_id
    assert out.input_ids[0, -1] == tokenizer.eos_token_id
    assert (out.input_ids[0] == tokenizer.eos_token_id).sum() == 1
    assert long.startswith(tokenizer.decode(out.input_ids[0]))


def test_decode_round_trip(tokenizer: Tokenizer) -> None:
    for caption in CAPTIONS[:5] + CAPTIONS[-1:]:
        assert tokenizer.decode(tokenizer(caption).input_ids[0]) == caption.lower()
    texts = ["a red circle", "a blue square on the left"]
    assert tokenizer.batch_decode(tokenizer(texts).input_ids) == texts
    assert tokenizer.decode(tokenizer("a red circle").input_ids[0].tolist()) == "a red circle"


def test_unseen_characters(tokenizer: Tokenizer) -> None:
    for text in ["café é", "a 🙂 circle", "ümlaut ß ø"]:
        out = tokenizer(text)
        assert out.input_ids.max() < tokenizer.vocab_size
        assert tokenizer.decode(out.input_ids[0]) == text.lower()


def test_save_load(tokenizer: Tokenizer, tmp_path) -> None:
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "config.json").is_file()
    loaded = Tokenizer.from_pretrained(tmp_path)
    texts = CAPTIONS + ["", "café 🙂", " ".join(CAPTIONS)]
    assert torch.equal(loaded(texts).input_ids, tokenizer(texts).input_ids)
    assert torch.equal(loaded(texts).attention_mask, tokenizer(texts).attention_mask)
    assert loaded.config == tokenizer.config


def test_from_config_is_byte_level() -> None:
    tok = Tokenizer.from_config(TokenizerConfig(max_length=12))
    assert tok.vocab_size == 259
    assert tok.decode(tok("Abc é").input_ids[0]) == "abc é"


def test_encoder_shapes(tokenizer: Tokenizer) -> None:
    encoder = tiny_encoder(tokenizer)
    ids = tokenizer(["a red circle", "a big blue square", ""]).input_ids
    out = encoder(ids)
    assert out.hidden_states.shape == (3, 16, 32)
    assert out.pooled.shape == (3, 32)
    assert encoder.hidden_size == 32 and encoder.pooled_dim == 32
    # shorter sequences are fine, longer ones are not
    assert encoder(ids[:, :8]).hidden_states.shape == (3, 8, 32)
    with pytest.raises(ValueError):
        encoder(torch.zeros(1, 17, dtype=torch.long))
    projected = tiny_encoder(tokenizer, projection_dim=24)
    assert projected(ids).pooled.shape == (3, 24) and projected.pooled_dim == 24


def test_pooled_at_first_eos(tokenizer: Tokenizer) -> None:
    encoder = tiny_encoder(tokenizer)
    ids = tokenizer("a red circle").input_ids
    eos = int((ids[0] == tokenizer.eos_token_id).nonzero()[0])
    out = encoder(ids)
    torch.testing.assert_close(out.pooled[0], out.hidden_states[0, eos])
    # a token after the eos (even one with a larger id, or a second eos) changes nothing up to the eos
    after = ids.clone()
    after[0, eos + 1] = tokenizer.vocab_size - 1
    after[0, eos + 3] = tokenizer.eos_token_id
    out_after = encoder(after)
    torch.testing.assert_close(out_after.pooled, out.pooled)
    torch.testing.assert_close(out_after.hidden_states[:, : eos + 1], out.hidden_states[:, : eos + 1])
    # a token before it does
    before = ids.clone()
    before[0, eos - 1] = tokenizer.vocab_size - 1
    assert not torch.allclose(encoder(before).pooled, out.pooled)
    # no eos: the last position
    no_eos = torch.full((1, 10), 5, dtype=torch.long)
    out_no_eos = encoder(no_eos)
    torch.testing.assert_close(out_no_eos.pooled[0], out_no_eos.hidden_states[0, -1])


def test_batch_independence(tokenizer: Tokenizer) -> None:
    encoder = tiny_encoder(tokenizer)
    texts = ["a red circle", "a tiny yellow triangle at the top", ""]
    batch = encoder(tokenizer(texts).input_ids)
    for i, text in enumerate(texts):
        single = encoder(tokenizer(text).input_ids)
        torch.testing.assert_close(single.hidden_states[0], batch.hidden_states[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(single.pooled[0], batch.pooled[i], atol=1e-5, rtol=1e-5)


def test_encoder_save_load(tokenizer: Tokenizer, tmp_path) -> None:
    encoder = tiny_encoder(tokenizer, projection_dim=16)
    encoder.save_pretrained(tmp_path)
    loaded = TextEncoder.from_pretrained(tmp_path)
    assert loaded.config == encoder.config
    ids = tokenizer(CAPTIONS[:4]).input_ids
    a, b = encoder(ids), loaded(ids)
    assert torch.equal(a.hidden_states, b.hidden_states) and torch.equal(a.pooled, b.pooled)
