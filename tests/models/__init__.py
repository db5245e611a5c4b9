"""Checkpoints as users bring them, built here: a tiny random-init Llama written with
save_pretrained, and tokenizers built with the `tokenizers` package (no download)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

SPECIALS = ["<s>", "</s>", "<pad>"]  # ids 0, 1, 2 in every tokenizer here
BPE_VOCAB = 320


def byte_bpe(vocab_size: int = BPE_VOCAB, lowercase: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style: any text encodes, and decodes back) trained on os.py, adding
    a BOS as Llama's does. lowercase: a normalizer that loses the text's case."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([Path(os.__file__).read_text()], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def word_level(words: tuple[str, ...] = ("def", "return", "import", "class", "self")) -> PreTrainedTokenizerFast:
    """A whitespace-split word vocabulary with an unknown token: most of any code maps to <unk>."""
    vocab = {t: i for i, t in enumerate([*SPECIALS, "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_llama(vocab_size: int = BPE_VOCAB) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)


def write_checkpoint(path: Path, dtype: torch.dtype = torch.float32, tokenizer: PreTrainedTokenizerFast | None = None,
                     vocab_size: int = BPE_VOCAB) -> Path:
    """A seeded random-init tiny Llama saved in `dtype` with save_pretrained, and its tokenizer beside it."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_llama(vocab_size)).to(dtype).save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


TP_PLAN = """version: 1
mesh: {devices: 2}
rules:
  - match: "model.layers.*.self_attn"
    attention: {strategy: tp}
  - match: "model.layers.*.mlp"
    mlp: {strategy: tp}
"""
