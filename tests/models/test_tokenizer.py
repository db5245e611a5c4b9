"""Which tokenizer a model gets, how text is encoded with it, and what bits per byte scores."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoConfig

from planc.errors import ModelError
from planc.models.registry import BOS_ID, load_model
from planc.models.tokenizer import BYTES, CHECKPOINT, ByteTokenizer, load_checkpoint_tokenizer, model_tokenizer, \
    tokenizer_files
from planc.zoo import corpus
from planc.zoo import eval as zoo_eval
from tests.models import byte_bpe, tiny_llama, word_level, write_checkpoint


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe")
    byte_bpe().save_pretrained(path)
    return path


def test_kind_of_each_model_reference(tmp_path, bpe_dir):
    assert model_tokenizer("tiny-deepseek", load_model("tiny-deepseek", meta=True).config).kind == BYTES
    config = tiny_llama()
    assert model_tokenizer(str(bpe_dir), config).kind == CHECKPOINT
    assert model_tokenizer(str(tmp_path), config) is None  # no tokenizer files, vocabulary not byte-level
    byte_like = tiny_llama(260)
    byte_like.bos_token_id, byte_like.eos_token_id = 256, 257
    assert model_tokenizer(str(tmp_path), byte_like).kind == BYTES
    assert tokenizer_files(str(tmp_path)) == {} and set(tokenizer_files(str(bpe_dir))) >= {"tokenizer.json"}


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(bpe_dir):
    with pytest.raises(ModelError, match="320 tokens but the model's vocab_size is 300"):
        model_tokenizer(str(bpe_dir), tiny_llama(300))


def test_remote_code_tokenizer_is_not_run(tmp_path):
    byte_bpe().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tok.EvilTokenizer", None]}
    config["tokenizer_class"] = "EvilTokenizer"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "tok.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ModelError, match=f"the tokenizer of {tmp_path}: cannot load it"):
        load_checkpoint_tokenizer(tmp_path)


def test_prompts_get_the_tokenizers_bos_and_outputs_drop_special_tokens(bpe_dir):
    tok = load_checkpoint_tokenizer(bpe_dir)
    ids = tok.encode("def f():\n    return 1")
    assert ids[0] == 0 and 0 not in ids[1:]  # <s>, as the tokenizer's post-processor adds it
    assert tok.decode(ids + [1]) == "def f():\n    return 1"  # <s> and </s> skipped
    assert ByteTokenizer().encode("a") == [BOS_ID, 97]


def test_document_bytes_sum_to_the_texts_and_specials_are_not_scored(bpe_dir):
    tok = load_checkpoint_tokenizer(bpe_dir)
    text = "  héllo 世界 🙂\n\tdef x():\n"  # 1-4 byte characters, split over byte-level tokens
    ids, scored, nbytes = zoo_eval.encode_document(tok, text, "a test string")
    assert ids[0] == 0 and ids[-1] == 1 and not scored[0] and not scored[-1] and scored[1:-1].all()
    assert nbytes.sum() == len(text.encode("utf-8")) and (nbytes[~scored] == 0).all()
    # Every token's bytes are those of the text it decodes to, once split characters are joined.
    assert tok.hf.decode(ids[1:-1].tolist()).encode("utf-8") == text.encode("utf-8")


def test_heldout_stream_covers_every_heldout_byte_once(bpe_dir):
    tok = load_checkpoint_tokenizer(bpe_dir)
    ids_T, scored_T, bytes_T = zoo_eval._text_stream(tok, "heldout")
    assert int(bytes_T.sum()) == sum(f.size for f in corpus.split_files("heldout"))
    assert int((~scored_T).sum()) == 2 * len(corpus.split_files("heldout"))  # <s> and </s> per file


def test_uniform_model_scores_log2_vocab_per_token(bpe_dir):
    class Uniform(torch.nn.Module):
        config = tiny_llama()

        def forward(self, input_ids, use_cache=False):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 320)})

    tok = load_checkpoint_tokenizer(bpe_dir)
    data = zoo_eval.eval_set(tok, max_bytes=3000)
    predicted = int(data.scored[:, 1:].sum())
    assert data.num_bytes() >= 3000 * 0.5  # about max_bytes: the windows are sized by the mean token
    got = zoo_eval.bits_per_byte(Uniform(), max_bytes=3000, tokenizer=tok)
    assert got == pytest.approx(predicted * math.log2(320) / data.num_bytes(), rel=1e-12)
    assert got < math.log2(320) / 1.3  # tokens of ~1.5 bytes: fewer bits per byte than per token


def test_eval_refuses_a_tokenizer_with_an_unknown_token(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", tokenizer=word_level(), vocab_size=16)
    with pytest.raises(ModelError, match=r"maps \d+ pieces of heldout file .* to its unknown token '<unk>'") as err:
        zoo_eval.bits_per_byte(str(ckpt), max_bytes=500)
    assert str(ckpt) in str(err.value) and "byte-level BPE" in str(err.value)


def test_eval_refuses_a_tokenizer_that_does_not_round_trip(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", tokenizer=byte_bpe(lowercase=True))
    with pytest.raises(ModelError, match="does not round-trip the evaluation text") as err:
        zoo_eval.bits_per_byte(str(ckpt), max_bytes=500)
    assert str(ckpt) in str(err.value)


def test_eval_refuses_a_model_without_tokenizer_or_byte_vocabulary(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ModelError, match=r"has no tokenizer .* vocabulary \(320 ids\) is not planc's byte-level"):
        zoo_eval.bits_per_byte(str(ckpt), max_bytes=500)
    with pytest.raises(ModelError, match="LlamaForCausalLM has no tokenizer"):
        zoo_eval.bits_per_byte(load_model(str(ckpt)), max_bytes=500)
    assert AutoConfig.from_pretrained(ckpt).vocab_size == 320
