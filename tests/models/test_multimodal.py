"""A multimodal checkpoint or config compiles its language model: the text part of Gemma 3,
LLaVA, Mistral 3, ... is a causal LM transformers has, that of Qwen2-VL, Qwen3-VL, GLM-4V, ... a
decoder transformers builds only inside the multimodal class (planc's TextCausalLM holds it and the
head), and for text alone it is the whole model (checked on a probe when loaded). The compiled
program against the multimodal model's own logits at 2 ranks; a multimodal class that computes
other logits for text than its language model's causal LM (Aya Vision's) is refused, and so is a
config with no decoder at all."""
from __future__ import annotations

import json

import pytest
import torch
import transformers as T

from planc.driver import compile
from planc.errors import ModelError
from planc.models.registry import LANGUAGE_MODEL_OF, load_model
from planc.plan import parse_plan_text
from planc.runtime.decode import generate
from planc.runtime.model import Model
from planc.runtime.threads import run_threads
from tests.models import TP_PLAN

TEXT = dict(vocab_size=260, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, head_dim=16, max_position_embeddings=256)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
PLAN = TP_PLAN


def _gemma3() -> T.PretrainedConfig:
    text = dict(TEXT, sliding_window=6, layer_types=["sliding_attention", "full_attention"])
    return T.Gemma3Config(text_config=text, vision_config=dict(VISION, image_size=28, patch_size=14),
                          mm_tokens_per_image=4, image_token_index=259, boi_token_index=257, eoi_token_index=258)


def _saved(config: T.PretrainedConfig, tmp_path) -> tuple[torch.nn.Module, str]:
    torch.manual_seed(0)
    model = T.AutoModelForImageTextToText.from_config(config).eval()
    model.save_pretrained(tmp_path / "ckpt")
    return model, str(tmp_path / "ckpt")


def test_a_gemma3_checkpoint_compiles_its_language_model_exact_at_two_ranks(tmp_path):
    vlm, path = _saved(_gemma3(), tmp_path)
    lines = []
    artifact = compile(path, parse_plan_text(PLAN, "plan.yaml"), tmp_path / "out", log=lines.append).path
    assert any("Gemma3ForConditionalGeneration is multimodal" in line and "Gemma3ForCausalLM" in line for line in lines)
    prompt = list(range(30, 47))  # ~3 windows of 6
    got = run_threads(lambda comm: generate(Model(str(artifact), comm=comm), [prompt], 4, keep_logits=True), 2)[0]
    with torch.no_grad():
        want = vlm(input_ids=torch.tensor([prompt + got.tokens[0]])).logits[0, len(prompt) - 1:-1]
    assert max((g[0] - w).abs().max().item() for g, w in zip(got.step_logits, want)) <= 1e-4  # fp32


@pytest.mark.parametrize("name", ["llava", "mistral3", "paligemma"])
def test_the_language_model_of_a_multimodal_checkpoint_is_its_decoder_and_head(tmp_path, name):
    """LLaVA (a Llama, its config no causal LM's), Mistral 3 (lm_head tied as the multimodal
    config says, its text config saying otherwise), PaliGemma (a Gemma)."""
    config = T.AutoConfig.for_model(name, text_config=dict(TEXT), vision_config=dict(VISION))
    vlm, path = _saved(config, tmp_path)
    model = load_model(path)
    assert getattr(model, LANGUAGE_MODEL_OF) == type(vlm).__name__
    ids = torch.tensor([[5, 17, 99, 3, 250, 8]])
    with torch.no_grad():
        assert (model(input_ids=ids).logits - vlm(input_ids=ids).logits).abs().max() <= 1e-5  # the same modules; fp32
    assert not any("vision" in n for n in model.state_dict())


def test_a_multimodal_config_on_meta_builds_the_language_model_alone(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_gemma3().to_dict()))
    model = load_model(str(path), meta=True)
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.lm_head.weight.is_meta
    assert getattr(model, LANGUAGE_MODEL_OF) == "Gemma3ForConditionalGeneration"


def test_a_multimodal_model_passed_in_python_compiles_its_language_model(tmp_path):
    torch.manual_seed(0)
    vlm = T.AutoModelForImageTextToText.from_config(_gemma3()).eval()
    artifact = compile(vlm, parse_plan_text(PLAN, "plan.yaml"), tmp_path / "out", meta=True)
    assert artifact.manifest["model"]["class"] == "Gemma3ForCausalLM"
    assert "model.layers.0.self_attn.q_proj" in artifact.report["graphs"]["lift"]


def test_a_multimodal_class_computing_other_logits_for_text_is_refused(tmp_path):
    """Aya Vision's head applies no logit scale where its Cohere 2 causal LM does."""
    config = T.AutoConfig.for_model("aya_vision", text_config=dict(TEXT, layer_types=["sliding_attention"] * 2),
                                    vision_config=dict(VISION))
    _, path = _saved(config, tmp_path)
    with pytest.raises(ModelError, match="AyaVisionForConditionalGeneration computes other logits for text alone than "
                                         "Cohere2ForCausalLM"):
        load_model(path)


def test_a_config_with_no_decoder_is_refused_by_name(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(T.ViTConfig().to_dict()))
    with pytest.raises(ModelError, match=r"ViTConfig \(model_type 'vit'\) is not a causal LM transformers builds; "):
        load_model(str(path), meta=True)


# Qwen2-VL's rope over three position axes (temporal, height, width) is one rope for text, whose
# three axes are the same positions; the sections must cover head_dim / 2.
MROPE = {"rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3]}}
GLM_ROPE = {"rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1], "partial_rotary_factor": 0.5}}
DECODER_ONLY = {
    "qwen2_vl": MROPE,
    "qwen2_5_vl": MROPE,
    "qwen3_vl_moe": dict(MROPE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "glm4v": GLM_ROPE,
    "glm4v_moe": dict(GLM_ROPE, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      first_k_dense_replace=1, n_group=1, topk_group=1),
}
QWEN_VISION = dict(depth=1, hidden_size=32, num_heads=2, out_hidden_size=64, intermediate_size=64)


@pytest.mark.parametrize("name", sorted(DECODER_ONLY))
def test_a_decoder_only_the_multimodal_class_builds_compiles_exact_at_two_ranks(tmp_path, name):
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL-MoE, GLM-4V and GLM-4.5V: no causal LM class for their text config; planc's
    TextCausalLM over the multimodal model's own decoder and head, generating as it does."""
    config = T.AutoConfig.for_model(name, text_config=dict(TEXT, **DECODER_ONLY[name]), vision_config=QWEN_VISION)
    vlm, path = _saved(config, tmp_path)
    model = load_model(path)
    assert type(model).__name__ == "TextCausalLM" and getattr(model, LANGUAGE_MODEL_OF) == type(vlm).__name__
    ids = torch.tensor([list(range(30, 37))])
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False),
                       vlm.generate(ids, max_new_tokens=4, do_sample=False))  # what `planc verify` compares against
    plan = PLAN.replace("mlp: {strategy: tp}", "moe: {strategy: ep}") if "moe" in name else PLAN
    artifact = compile(path, parse_plan_text(plan, "plan.yaml"), tmp_path / "out").path
    prompt = list(range(30, 47))
    got = run_threads(lambda comm: generate(Model(str(artifact), comm=comm), [prompt], 4, keep_logits=True), 2)[0]
    with torch.no_grad():
        want = vlm(input_ids=torch.tensor([prompt + got.tokens[0]])).logits[0, len(prompt) - 1:-1]
    assert max((g[0] - w).abs().max().item() for g, w in zip(got.step_logits, want)) <= 1e-4  # fp32


def test_a_decoder_only_multimodal_config_on_meta_plans_its_language_model(tmp_path):
    """Qwen3-VL keeps no token ids in its configs (its generation config has them): None, not an error."""
    config = T.AutoConfig.for_model("qwen3_vl", text_config=dict(TEXT, **MROPE), vision_config=QWEN_VISION)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    artifact = compile(str(path), parse_plan_text(PLAN, "plan.yaml"), tmp_path / "out", meta=True)
    assert artifact.manifest["model"]["class"] == "TextCausalLM" and artifact.manifest["model"]["eos_token_id"] is None
    assert artifact.report["per_rank"][0]["weight_bytes"] > 0


def test_a_multimodal_model_on_meta_plans_its_language_model(tmp_path):
    """Nothing to probe on meta: the dry run plans the language model as its causal LM computes it."""
    with torch.device("meta"):
        vlm = T.AutoModelForImageTextToText.from_config(_gemma3())
    artifact = compile(vlm, parse_plan_text(PLAN, "plan.yaml"), tmp_path / "out", meta=True)
    assert artifact.manifest["model"]["class"] == "Gemma3ForCausalLM"


def test_a_llama4_checkpoint_loads_its_language_model(tmp_path):
    """transformers builds Llama 4's multimodal config as its causal LM itself, leaving the vision
    tower's tensors unread (planc checks for missing tensors, and its load report is not printed)."""
    from tests.lift.test_llama4 import llama4

    text = llama4().config.to_dict()
    vision = dict(VISION, image_size=28, patch_size=14, vision_output_dim=32, projector_input_dim=32,
                  projector_output_dim=32)
    torch.manual_seed(0)
    vlm = T.Llama4ForConditionalGeneration(T.Llama4Config(text_config=text, vision_config=vision,
                                                          image_token_index=259)).eval()
    vlm.save_pretrained(tmp_path / "ckpt")
    model = load_model(str(tmp_path / "ckpt"))
    assert type(model).__name__ == "Llama4ForCausalLM"
    ids = torch.tensor([list(range(30, 49))])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, vlm.language_model(input_ids=ids).logits)


def test_torch_compile_of_a_multimodal_model_is_refused_with_what_to_do_instead():
    """The torch.compile backend gets the whole multimodal forward's graph (towers included), which
    is not the language model planc compiles."""
    from planc.driver import resolve_model

    with torch.device("meta"):
        vlm = T.AutoModelForImageTextToText.from_config(_gemma3())
    with pytest.raises(ModelError, match=r"Gemma3ForConditionalGeneration is multimodal: .* compile it with `planc "
                                         r"compile` or planc.driver.compile\(model, plan, out\)"):
        resolve_model(vlm, parse_plan_text(PLAN, "plan.yaml"), True, graph_given=True)


def test_a_config_whose_rope_does_not_fit_its_width_is_refused_naming_the_rope(tmp_path):
    """GLM-4V's sections of the rope over three axes must cover the rotated half of head_dim;
    transformers' own forward fails otherwise, and planc says so rather than crash."""
    rope = {"rope_parameters": {"rope_type": "default", "mrope_section": [8, 12, 12], "partial_rotary_factor": 0.5}}
    config = T.AutoConfig.for_model("glm4v", text_config=dict(TEXT, **rope), vision_config=QWEN_VISION)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    with pytest.raises(ModelError, match=r"Glm4vTextRotaryEmbedding: the model's rotary embedding fails on one "
                                         r"position \(RuntimeError: split_with_sizes"):
        compile(str(path), parse_plan_text(PLAN, "plan.yaml"), tmp_path / "out", meta=True)
