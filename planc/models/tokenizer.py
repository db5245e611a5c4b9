"""Text <-> token ids for `planc run --prompt`, `planc verify` and `planc eval`.

A model's tokenizer is one of three kinds, recorded as manifest["model"]["tokenizer"]:

    bytes       the bundled models' byte-level vocabulary: ids 0-255 are UTF-8 bytes, then BOS, EOS,
                PAD (a model whose config has that vocabulary size and those BOS/EOS ids)
    checkpoint  the checkpoint directory's own transformers tokenizer (AutoTokenizer, local files
                only, never remote code); `planc compile` copies its files into ARTIFACT/tokenizer/
    none        no tokenizer: prompts are token ids only, and nothing can be scored per byte

Prompts are encoded with the tokenizer's own special tokens (a BOS where it adds one); outputs
are decoded without special tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from transformers import PretrainedConfig

from planc.errors import ModelError
from planc.models.registry import BOS_ID, BYTE_VOCAB, EOS_ID

BYTES, CHECKPOINT, NONE = "bytes", "checkpoint", "none"
# What AutoTokenizer reads from a directory. config.json goes too: a tokenizer_config.json without
# tokenizer_class names its class through the config's model_type.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "merges.txt",
                   "vocab.txt", "chat_template.jinja", "chat_template.json")
RESAVE = "save the tokenizer the model was trained with into the checkpoint directory (tokenizer.save_pretrained(DIR))"


def encode(text: str, bos: bool = True) -> list[int]:
    """Byte-level: [BOS] + the UTF-8 bytes of text."""
    return ([BOS_ID] if bos else []) + list(text.encode("utf-8"))


def decode(ids: list[int]) -> str:
    """Byte-level: bytes to text; special ids are dropped, broken UTF-8 shows as U+FFFD."""
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class Tokenizer(Protocol):
    kind: str
    name: str  # for messages: what the tokenizer is and where it came from

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class ByteTokenizer:
    kind: str = BYTES
    name: str = "planc's byte-level tokenizer"

    def encode(self, text: str) -> list[int]:
        return encode(text)

    def decode(self, ids: list[int]) -> str:
        return decode(ids)


@dataclass(frozen=True)
class CheckpointTokenizer:
    hf: object  # a transformers PreTrainedTokenizerBase
    name: str
    kind: str = CHECKPOINT

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text, add_special_tokens=True)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)


def is_byte_vocab(config: PretrainedConfig | None) -> bool:
    """The bundled models' vocabulary: its size and its BOS/EOS ids."""
    ids = (getattr(config, "vocab_size", None), getattr(config, "bos_token_id", None), getattr(config, "eos_token_id", None))
    return ids == (BYTE_VOCAB, BOS_ID, EOS_ID)


def tokenizer_files(source: str | None) -> dict[str, Path]:
    """The tokenizer files of a checkpoint directory ({} when it has none), keyed by file name."""
    root = Path(source) if source else None
    if root is None or not root.is_dir() or not any((root / n).is_file() for n in TOKENIZER_FILES):
        return {}
    return {n: root / n for n in (*TOKENIZER_FILES, "config.json") if (root / n).is_file()}


def load_checkpoint_tokenizer(directory: Path, name: str | None = None) -> CheckpointTokenizer:
    from transformers import AutoTokenizer

    name = name or f"the tokenizer of {directory}"
    try:
        hf = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for unreadable or remote-code tokenizers
        raise ModelError(f"{name}: cannot load it with AutoTokenizer (local files, no remote code): "
                         f"{type(exc).__name__}: {exc}. Fix or remove its tokenizer files, or {RESAVE}") from exc
    return CheckpointTokenizer(hf, name)


def model_tokenizer(source: str | None, config: PretrainedConfig | None) -> Tokenizer | None:
    """The tokenizer of MODEL: its checkpoint's own, else byte-level for the bundled vocabulary, else None."""
    if tokenizer_files(source):
        tokenizer = load_checkpoint_tokenizer(Path(source))
        vocab = getattr(config, "vocab_size", None)
        if vocab is not None and len(tokenizer.hf) > vocab:
            raise ModelError(f"{tokenizer.name} has {len(tokenizer.hf)} tokens but the model's vocab_size is {vocab}: "
                             f"ids past {vocab - 1} have no embedding row. {RESAVE}")
        return tokenizer
    return ByteTokenizer() if is_byte_vocab(config) else None


def artifact_tokenizer(manifest: dict, tokenizer_dir: Path | None) -> Tokenizer | None:
    """The tokenizer an artifact was compiled with (tokenizer_dir: its checked tokenizer/ copy)."""
    kind = manifest["model"]["tokenizer"]
    if kind == BYTES:
        return ByteTokenizer()
    if kind == CHECKPOINT and tokenizer_dir is not None:
        return load_checkpoint_tokenizer(tokenizer_dir, f"the tokenizer of {manifest['model']['source']} "
                                                        f"(copied to {tokenizer_dir})")
    return None


def no_tokenizer(source: str, vocab_size: int | None, needed_for: str) -> ModelError:
    """The error when text is needed but MODEL has no tokenizer."""
    vocab = f" ({vocab_size} ids)" if vocab_size else ""
    return ModelError(f"{source} has no tokenizer (no {' / '.join(TOKENIZER_FILES[:2])} in the checkpoint) and its "
                      f"vocabulary{vocab} is not planc's byte-level one, so {needed_for} cannot turn text into its "
                      f"token ids; {RESAVE}")
