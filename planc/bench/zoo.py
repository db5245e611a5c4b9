"""`planc bench zoo`: quality and structure of the bundled trained models on held-out text.

bpb: held-out bits per byte of each model; draft_agreement: top-1 next-token agreement of
tiny-draft with tiny-deepseek; topk_hotness: per MoE layer, the median over token ids of the share
of a token's routings that go to its k most frequent experts; latent_top_half_energy: per MLA
layer, the share of the normalized latent's variance in the top half of its PCA spectrum.
The same figures are stored in models/weights/manifest.json when a model is trained.
"""
from __future__ import annotations

from planc.models.registry import load_model
from planc.zoo import eval as zoo_eval

TARGET, DRAFT = "tiny-deepseek", "tiny-draft"


def run() -> dict:
    target, draft = load_model(TARGET), load_model(DRAFT)
    return {
        "bpb": {TARGET: zoo_eval.bits_per_byte(target), DRAFT: zoo_eval.bits_per_byte(draft)},
        "draft_agreement": zoo_eval.draft_agreement(draft, target),
        "topk_hotness": zoo_eval.topk_hotness(target),
        "latent_top_half_energy": zoo_eval.latent_top_half_energy(target),
        "eval_set": {"split": "heldout", "windows": zoo_eval.EVAL_WINDOWS, "seq_len": zoo_eval.EVAL_SEQ},
    }


def table(result: dict) -> str:
    rows = [("bits per byte", "")]
    rows += [(f"  {name}", f"{value:.4f}") for name, value in result["bpb"].items()]
    rows += [("draft agreement (top-1)", f"{result['draft_agreement']:.4f}"), ("top-k hotness", "")]
    rows += [(f"  {fqn}", f"{value:.4f}") for fqn, value in result["topk_hotness"].items()]
    rows += [("latent top-half energy", "")]
    rows += [(f"  {fqn}", f"{value:.4f}") for fqn, value in result["latent_top_half_energy"].items()]
    width = max(len(label) for label, _ in rows)
    eval_set = result["eval_set"]
    header = f"zoo: held-out text, {eval_set['windows']} windows x {eval_set['seq_len']} tokens"
    return "\n".join([header] + [f"{label:<{width}}  {value}" for label, value in rows])
