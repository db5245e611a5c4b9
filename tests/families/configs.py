"""Tiny random-init configs of the decoder families transformers ships, one per variant planc lifts.

Each is small enough to compile, capture and run on 2 CPU ranks in seconds; the dims divide by 2
and 4 so every strategy applies at both sizes. What each one exercises:

    llama        GQA, tied embeddings
    qwen2        q/k/v biases
    qwen3        per-head q/k RMSNorm, tied embeddings
    mixtral      softmax top-k router, always renormalized
    qwen2_moe    softmax top-k, not renormalized, weights in the model dtype; shared expert
                 scaled by a sigmoid gate
    qwen3_moe    softmax top-k, renormalized; per-head q/k norm
    olmoe        q/k RMSNorm over the whole projection; 2 KV heads (replicated at 4 ranks)
    deepseek_v2  MLA without q LoRA, complex-pair rope, softmax group-limited greedy router
                 (group score = max), scaled weights, shared experts, first layer dense
    deepseek_v3  MLA with q LoRA, interleaved rope, sigmoid router with correction bias (Kimi-K2's)
"""
from __future__ import annotations

from pathlib import Path

import torch
import transformers as T

COMMON = dict(vocab_size=260, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
              bos_token_id=256, eos_token_id=257, pad_token_id=258)
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
           n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
           n_shared_experts=1, n_group=2, topk_group=1)


def configs() -> dict[str, T.PretrainedConfig]:
    return {
        "llama": T.LlamaConfig(**COMMON, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True),
        "qwen2": T.Qwen2Config(**COMMON, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=False),
        "qwen3": T.Qwen3Config(**COMMON, intermediate_size=128, num_key_value_heads=2, head_dim=16,
                               tie_word_embeddings=True),
        "mixtral": T.MixtralConfig(**COMMON, intermediate_size=64, num_key_value_heads=2, num_local_experts=4,
                                   num_experts_per_tok=2, tie_word_embeddings=False),
        "qwen2_moe": T.Qwen2MoeConfig(**COMMON, intermediate_size=128, num_key_value_heads=2, num_experts=4,
                                      num_experts_per_tok=2, moe_intermediate_size=32,
                                      shared_expert_intermediate_size=64, norm_topk_prob=False,
                                      tie_word_embeddings=False),
        "qwen3_moe": T.Qwen3MoeConfig(**COMMON, intermediate_size=128, num_key_value_heads=2, head_dim=16,
                                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                      norm_topk_prob=True, tie_word_embeddings=False),
        "olmoe": T.OlmoeConfig(**COMMON, intermediate_size=32, num_key_value_heads=2, num_experts=4,
                               num_experts_per_tok=2, tie_word_embeddings=False),
        "deepseek_v2": T.DeepseekV2Config(**COMMON, **MLA, intermediate_size=128, q_lora_rank=None,
                                          topk_method="group_limited_greedy", routed_scaling_factor=1.5,
                                          tie_word_embeddings=False),
        "deepseek_v3": T.DeepseekV3Config(**COMMON, **MLA, intermediate_size=128, q_lora_rank=32,
                                          routed_scaling_factor=2.5, norm_topk_prob=True, rope_interleave=True,
                                          tie_word_embeddings=False),
    }


FAMILIES = tuple(configs())


def build(name: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The family's model, seeded random init (transformers' own initialization)."""
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(configs()[name]).to(dtype).eval()


def save(name: str, root: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A checkpoint directory written by save_pretrained, as a user would bring it."""
    path = root / name
    build(name, dtype).save_pretrained(path)
    return path
