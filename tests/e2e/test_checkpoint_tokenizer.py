"""A checkpoint as users bring it (a random-init Llama with its own byte-level BPE tokenizer, saved
with save_pretrained) through `planc compile`, `run --prompt`, `verify` and `eval` on 2 gloo ranks."""
from __future__ import annotations

import hashlib
import json
import math
import shutil

import pytest

from planc.cli import main
from planc.runtime.artifact import read_manifest
from tests.models import TP_PLAN, byte_bpe, write_checkpoint

PROMPT = "def main():\n    return"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(checkpoint, artifact): the plan names no model (so model.dtype is auto) and no dtype."""
    root = tmp_path_factory.mktemp("ckpt_tok")
    ckpt = write_checkpoint(root / "ckpt", tokenizer=byte_bpe())
    (root / "plan.yaml").write_text(TP_PLAN)
    assert main(["compile", str(ckpt), str(root / "plan.yaml"), "-o", str(root / "art")]) == 0
    return ckpt, root / "art"


def test_the_artifact_carries_the_checkpoints_tokenizer(compiled):
    ckpt, artifact = compiled
    manifest = read_manifest(artifact)
    assert manifest["model"]["tokenizer"] == "checkpoint" and manifest["dtype"] == "float32"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        want = hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
        assert manifest["files"][f"tokenizer/{name}"] == want == hashlib.sha256((artifact / "tokenizer" / name).read_bytes()).hexdigest()


def test_run_prompt_decodes_text_without_the_checkpoint(compiled, tmp_path, capsys):
    from transformers import AutoTokenizer

    ckpt, artifact = compiled
    moved = shutil.move(ckpt, tmp_path / "elsewhere")  # `planc run` needs only the artifact
    try:
        assert main(["run", str(artifact), "--prompt", PROMPT, "--max-new-tokens", "6", "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
    finally:
        shutil.move(moved, ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert result["prompts"] == [PROMPT] and len(result["tokens"][0]) == 6 and result["ranks_agree"]
    assert result["texts"] == [tok.decode(result["tokens"][0], skip_special_tokens=True)]


def test_verify_uses_the_tokenizers_ids_and_passes(compiled, capsys):
    assert main(["verify", str(compiled[1]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # fp32: the 2-rank partial sums reorder additions, ~1e-7 on these logits.
    assert report["passed"] and report["token_agreement"] == 1.0 and report["max_logit_diff"] <= 1e-4, report
    assert report["tokens_compared"] == 3 * 16


def test_eval_alone_and_compiled_give_one_finite_figure(compiled, capsys):
    ckpt, artifact = compiled
    assert main(["eval", str(ckpt), "--max-bytes", "1000", "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)["bpb"]
    assert main(["eval", str(ckpt), "--artifact", str(artifact), "--max-bytes", "1000", "--json"]) == 0
    ranks = json.loads(capsys.readouterr().out)["bpb"]
    # A random init is near uniform: log2(320) = 8.3 bits per token over ~1.5-byte tokens.
    assert math.isfinite(alone) and 3 < alone < 8.3
    assert ranks == pytest.approx(alone, abs=1e-4)  # fp32 on 2 ranks: ~1e-7 relative on the logits


def test_an_edited_or_added_tokenizer_file_is_refused(compiled, tmp_path, capsys):
    artifact = shutil.copytree(compiled[1], tmp_path / "art")
    (artifact / "tokenizer" / "extra.json").write_text("{}")
    assert main(["run", str(artifact), "--prompt", PROMPT]) == 2
    assert "extra.json: not listed in manifest.json" in capsys.readouterr().err
    (artifact / "tokenizer" / "extra.json").unlink()
    with open(artifact / "tokenizer" / "tokenizer.json", "a") as f:
        f.write(" ")
    assert main(["run", str(artifact), "--prompt", PROMPT]) == 2
    assert "tokenizer.json: sha256" in capsys.readouterr().err


def test_prompt_text_needs_a_tokenizer(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "ckpt")  # no tokenizer, a 320-id vocabulary
    (tmp_path / "plan.yaml").write_text(TP_PLAN)
    assert main(["compile", str(ckpt), str(tmp_path / "plan.yaml"), "-o", str(tmp_path / "art")]) == 0
    assert read_manifest(tmp_path / "art")["model"]["tokenizer"] == "none"
    assert main(["run", str(tmp_path / "art"), "--prompt", PROMPT]) == 2
    err = capsys.readouterr().err
    assert "has no tokenizer" in err and "tokenizer.save_pretrained" in err
    assert main(["eval", str(ckpt), "--artifact", str(tmp_path / "art")]) == 2
    assert "planc eval cannot turn text into its token ids" in capsys.readouterr().err
