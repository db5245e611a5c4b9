"""A causal LM over a multimodal model's own decoder and lm_head, for a text config transformers
has no causal LM class for (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V, ...: their text model is a
decoder whose config only the multimodal class builds).

It computes what every transformers causal LM computes, `lm_head(decoder(ids))`, and generates
with transformers' own GenerationMixin (what `planc verify` compares against). Whether that is the
multimodal model's computation for text alone is not assumed: planc.models.registry runs both on
a probe when there are weights, and the lift checks the decoder against its captured graph.
"""
from __future__ import annotations

import torch
import transformers
from torch import nn
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast


class TextCausalLM(transformers.PreTrainedModel, GenerationMixin):
    """`decoder` and `head` (not copied) as a causal LM of `config`, the multimodal model's text config."""

    base_model_prefix = "model"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: transformers.PretrainedConfig, decoder: nn.Module, head: nn.Linear):
        super().__init__(config)
        self.model, self.lm_head = decoder, head

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return True  # the experts are the decoder's, built with the implementation the config pins

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, inputs_embeds: torch.Tensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0, **kwargs) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return CausalLMOutputWithPast(logits=self.lm_head(hidden[:, keep, :]), cache=out.cache)
