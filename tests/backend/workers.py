"""Rank entry points of the backend tests (started by planc.runtime.launch, one process per rank)."""
from __future__ import annotations

import torch
import transformers

from planc.models.registry import load_model, pin_static_paths
from planc.runtime.launch import write_result
from planc.torch_compile import compile_records


def eager_and_compiled(args: dict) -> None:
    """Each model's largest |compiled - eager| logit, on this rank, for a prompt and 3 grown steps."""
    torch._dynamo.reset()
    found = {}
    for name, plan in args["plans"].items():
        model = _model(name)
        ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
        compiled = torch.compile(model, backend="planc", options={"plan": plan})
        worst = 0.0
        for _ in range(4):
            with torch.no_grad():
                want = model(ids, use_cache=False).logits
            got = compiled(ids, use_cache=False).logits
            worst = max(worst, (got - want).abs().max().item())
            ids = torch.cat([ids, want[:, -1:].argmax(-1)], 1)
        found[name] = worst
    write_result({"max_abs_diff": found, "compiles": len(compile_records())})


def _model(name: str) -> torch.nn.Module:
    if name == "tiny-deepseek":
        return load_model(name, dtype="float32")
    torch.manual_seed(0)  # every rank builds the same random weights
    config = pin_static_paths(transformers.Qwen3Config(
        vocab_size=260, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=True))
    return transformers.AutoModelForCausalLM.from_config(config).eval()
