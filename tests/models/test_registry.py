"""A model built on meta has the parameters, buffers (shapes, dtypes) and weight tying of the same
model built with weights, or on meta by transformers alone: skipping initialization there leaves
nothing else out."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from planc.errors import ModelError
from planc.models.registry import bundled_config, init_model, load_model


def _layout(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return [(name, tuple(t.shape), t.dtype) for name, t in named]


@pytest.mark.parametrize("tied", [False, True])
def test_meta_build_matches_a_built_model_tied_weights_included(tied):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    meta, real = init_model(config, torch.float32, meta=True), init_model(config, torch.float32, meta=False)
    assert next(meta.parameters()).is_meta and not meta.training
    assert _layout(meta) == _layout(real)
    assert (meta.lm_head.weight is meta.model.embed_tokens.weight) == tied
    assert (real.lm_head.weight is real.model.embed_tokens.weight) == tied


def test_deepseek_v3_on_meta_is_what_transformers_builds_on_meta():
    config = bundled_config("deepseek-v3")
    with torch.device("meta"):
        plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = init_model(bundled_config("deepseek-v3"), torch.bfloat16, meta=True)
    assert len(model.model.layers) == 61 and _layout(model) == _layout(plain)


@pytest.mark.parametrize("architectures, says", [
    (["DeepseekV3ForCausalLM"], 'its architectures name DeepseekV3ForCausalLM, which transformers has: set "model_type": '
                                '"deepseek_v3" in a copy of config.json'),
    (["MysteryForCausalLM"], "planc lifts causal LMs of the model types transformers ships"),
])
def test_a_model_type_transformers_does_not_ship_is_refused_naming_the_fix(tmp_path, architectures, says):
    config = {"model_type": "kimi_k2", "architectures": architectures, "vocab_size": 64, "hidden_size": 16,
              "auto_map": {"AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"")
    for source in (tmp_path, tmp_path / "config.json"):  # a checkpoint directory, a config.json
        with pytest.raises(ModelError) as err:
            load_model(str(source), meta=True)
        assert str(err.value).startswith(f"{tmp_path / 'config.json'}: model_type 'kimi_k2' is not one transformers")
        assert "auto_map; planc runs none" in str(err.value) and says in str(err.value)
