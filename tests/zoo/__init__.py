"""Tests of the bundled models' corpus, training loop, evaluation and shipped weights.

Shared here: miniature configs of the two bundled architectures, small enough that a 50-step
training run takes a couple of seconds on one core.
"""
from __future__ import annotations

from transformers import DeepseekV3Config, LlamaConfig

from planc.models.registry import BOS_ID, BYTE_VOCAB, EOS_ID, PAD_ID

SPECIALS = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}


def mini_deepseek() -> DeepseekV3Config:
    return DeepseekV3Config(
        vocab_size=BYTE_VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
        first_k_dense_replace=1, max_position_embeddings=64, rope_interleave=True,
        tie_word_embeddings=False, **SPECIALS,
    )


def mini_llama() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=BYTE_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        tie_word_embeddings=False, **SPECIALS,
    )
