"""Byte-level BPE tokenizer trained on the captions, with fixed-length padded output for the text encoder.

Wraps a Hugging Face ``tokenizers.Tokenizer``: NFKC + lowercase normalisation, a byte-level
pre-tokenizer (every byte is in the base alphabet, so no character is ever unknown), ``<bos>``
and ``<eos>`` added around every prompt, truncation that keeps ``<eos>``, and padding with
``<pad>`` (id 0) to ``max_length``. Saved as ``tokenizer.json`` (the ``tokenizers`` format) next
to the usual ``config.json``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from .config import CONFIG_NAME, Configurable, config_from_dict, read_json, write_json

TOKENIZER_NAME = "tokenizer.json"


@dataclass
class TokenizerConfig:
    """Settings of :class:`Tokenizer`; ``vocab_size`` is the actual size of the trained vocabulary."""

    max_length: int = 77
    vocab_size: int = 1024
    pad_token: str = "<pad>"
    bos_token: str = "<bos>"
    eos_token: str = "<eos>"


@dataclass
class TokenizerOutput:
    """Token ids and attention mask, both (B, max_length) int64; the mask is 1 on bos, text and eos."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __getitem__(self, key: str) -> torch.Tensor:
        return getattr(self, key)

    def to(self, device: str | torch.device) -> TokenizerOutput:
        """Both tensors moved to ``device``."""
        return TokenizerOutput(self.input_ids.to(device), self.attention_mask.to(device))


def _special_tokens(config: TokenizerConfig) -> list[str]:
    return [config.pad_token, config.bos_token, config.eos_token]


def _untrained_backend(config: TokenizerConfig) -> HFTokenizer:
    """A BPE model with the special tokens and the 256 byte symbols, no merges, and the pipeline set up."""
    vocab = {token: i for i, token in enumerate(_special_tokens(config))}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.add_special_tokens(_special_tokens(config))
    return backend


def _configure(backend: HFTokenizer, config: TokenizerConfig) -> HFTokenizer:
    """Set normaliser, pre-tokenizer, decoder, bos/eos template, truncation and padding on ``backend``."""
    ids = [backend.token_to_id(token) for token in _special_tokens(config)]
    if any(i is None for i in ids):
        raise ValueError(f"tokenizer vocabulary lacks one of the special tokens {_special_tokens(config)}")
    pad_id, bos_id, eos_id = ids
    if pad_id != 0:
        raise ValueError(f"{config.pad_token!r} must have id 0, not {pad_id}")
    if config.max_length < 2:
        raise ValueError("max_length must leave room for <bos> and <eos>")
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{config.bos_token} $A {config.eos_token}",
        special_tokens=[(config.bos_token, bos_id), (config.eos_token, eos_id)],
    )
    # Truncation leaves room for the two tokens the post-processor adds, so eos always survives.
    backend.enable_truncation(max_length=config.max_length)
    backend.enable_padding(pad_id=pad_id, pad_token=config.pad_token, length=config.max_length)
    return backend


class Tokenizer(Configurable):
    """Byte-level BPE tokenizer producing fixed-length ``input_ids`` / ``attention_mask`` tensors.

    Build one with :meth:`train` on captions, or load one with :meth:`from_pretrained`. Built from
    a config alone it has only the byte alphabet (no merges): valid, but one token per byte.
    """

    config_class = TokenizerConfig

    def __init__(self, config: TokenizerConfig, backend: HFTokenizer | None = None) -> None:
        backend = _configure(backend or _untrained_backend(config), config)
        self.backend = backend
        self.config = dataclasses.replace(config, vocab_size=backend.get_vocab_size())

    @classmethod
    def train(
        cls,
        captions: Iterable[str],
        vocab_size: int = 1024,
        max_length: int = 77,
        min_frequency: int = 1,
    ) -> Tokenizer:
        """Learn BPE merges on ``captions`` (vocabulary of at most ``vocab_size``, specials included)."""
        config = TokenizerConfig(max_length=max_length, vocab_size=vocab_size)
        backend = HFTokenizer(models.BPE())
        backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=_special_tokens(config),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(captions, trainer=trainer)
        return cls(config, backend)

    def __call__(self, text: str | Sequence[str]) -> TokenizerOutput:
        """Tokenize one prompt or a list of prompts into (B, max_length) ids and mask."""
        texts = [text] if isinstance(text, str) else list(text)
        encodings = self.backend.encode_batch(texts) if texts else []
        if not encodings:
            empty = torch.zeros(0, self.max_length, dtype=torch.long)
            return TokenizerOutput(empty, empty.clone())
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return TokenizerOutput(ids, mask)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Text of one row of ids, special tokens skipped."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes one row of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=True)
        return text[1:] if text.startswith(" ") else text  # the prefix space the pre-tokenizer added

    def batch_decode(self, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Texts of a (B, L) batch of ids."""
        return [self.decode(row) for row in ids]

    @property
    def pad_token_id(self) -> int:
        return self.backend.token_to_id(self.config.pad_token)

    @property
    def bos_token_id(self) -> int:
        return self.backend.token_to_id(self.config.bos_token)

    @property
    def eos_token_id(self) -> int:
        return self.backend.token_to_id(self.config.eos_token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    @property
    def max_length(self) -> int:
        return self.config.max_length

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` before truncation, ``<bos>`` and ``<eos>`` included (more than
        :attr:`max_length` means the model would not see the end of it)."""
        encoding = self.backend.encode(text)
        return sum(encoding.attention_mask) + sum(sum(o.attention_mask) - 2 for o in encoding.overflowing)

    def __len__(self) -> int:
        return self.vocab_size

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` and ``tokenizer.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / CONFIG_NAME, self.config_dict())
        self.backend.save(str(directory / TOKENIZER_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device | None = None) -> Tokenizer:
        """Load a tokenizer written by :meth:`save_pretrained` (``device`` is accepted and ignored)."""
        directory = Path(directory)
        data = read_json(directory / CONFIG_NAME)
        name = data.get("_class_name")
        if name is not None and name != cls.__name__:
            raise ValueError(f"{directory} holds a {name}, not a {cls.__name__}")
        path = directory / TOKENIZER_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
        return cls(config_from_dict(cls.config_class, data), HFTokenizer.from_file(str(path)))
