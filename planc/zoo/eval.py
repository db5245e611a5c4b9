"""Quality figures of a model on held-out text, alone or compiled and run on N ranks.

The evaluation set is fixed: EVAL_WINDOWS windows of EVAL_SEQ tokens, evenly spaced over the
held-out split's token stream, each read from position 0 with nothing before it. The stream is
each held-out file tokenized by the model's tokenizer (planc.models.tokenizer), followed by an EOS
separator. For the bundled byte-level models (corpus.windows): 64 x 256 tokens = 16,320
predictions (about 16 KB of held-out text); a full pass of tiny-deepseek takes a few seconds on 2
cores. `max_bytes` asks for fewer (or more) windows: ceil(max_bytes / 255) for byte-level models,
about max_bytes of text for a checkpoint's own tokenizer.

Bits per byte: the sum of -log2 p(next token) over the predicted text tokens (special tokens such
as BOS/EOS are not scored) divided by the UTF-8 bytes of the text those tokens cover. A byte-level
model's text tokens are its bytes. A checkpoint tokenizer must encode the held-out text faithfully:
a file with a character mapped to its unknown token, or whose tokens do not decode back to it, is
an error (its bits per byte would not be about the text).

Legend: N windows, S tokens per window, T stream tokens, V vocab, E experts, K experts per token,
C latent dim.
"""
from __future__ import annotations

import functools
import json
import math
import statistics
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from planc.errors import ModelError
from planc.ops import Step
from planc.models.registry import WEIGHTS_DIR, load_model
from planc.models.tokenizer import BYTES, CheckpointTokenizer, ByteTokenizer, Tokenizer, is_byte_vocab, \
    model_tokenizer, no_tokenizer
from planc.zoo import corpus

EVAL_WINDOWS = 64
EVAL_SEQ = 256
EVAL_BATCH = 16  # windows per forward: bounds the [B, S, V] logits and the attention scores
MIN_OCCURRENCES = 20  # topk_hotness ignores token ids seen fewer times in the evaluation set
LOGITS_BUDGET = 1 << 24  # elements of [B, S, V] logits per forward: fewer windows per batch for large V
FAITHFUL = ("use the tokenizer the model was trained with; one that covers every byte (a byte-level BPE, "
            "or SentencePiece with byte fallback) encodes any text")

ModelRef = str | nn.Module


def eval_ids(split: str = "heldout", max_bytes: int | None = None, seq_len: int = EVAL_SEQ) -> torch.Tensor:
    """The fixed evaluation windows [N, S] of `split` (see the module docstring)."""
    _check_corpus()
    num = EVAL_WINDOWS if max_bytes is None else max(1, math.ceil(max_bytes / (seq_len - 1)))
    return corpus.windows(split, num, seq_len)


@dataclass(frozen=True)
class EvalSet:
    """Windows of token ids with, per token, whether it is scored as a target (a text token, not a
    special one) and the UTF-8 bytes of text it covers."""

    ids: torch.Tensor  # [N, S] int64
    scored: torch.Tensor  # [N, S] bool
    bytes: torch.Tensor  # [N, S] int64

    def batches(self, size: int) -> Iterator[EvalSet]:
        return map(EvalSet, self.ids.split(size), self.scored.split(size), self.bytes.split(size))

    def num_bytes(self) -> int:
        """The bytes the predictions cover (every token but each window's first is predicted)."""
        return int(self.bytes[:, 1:][self.scored[:, 1:]].sum())


def eval_set(tokenizer: Tokenizer, split: str = "heldout", max_bytes: int | None = None,
             seq_len: int = EVAL_SEQ) -> EvalSet:
    """The fixed evaluation windows of `split` as `tokenizer` encodes it (module docstring)."""
    if tokenizer.kind == BYTES:
        ids = eval_ids(split, max_bytes, seq_len)
        return EvalSet(ids, ids < 256, (ids < 256).long())
    _check_corpus()
    ids_T, scored_T, bytes_T = _text_stream(tokenizer, split)
    per_token = bytes_T.sum().item() / max(scored_T.sum().item(), 1)
    num = EVAL_WINDOWS if max_bytes is None else max(1, math.ceil(max_bytes / ((seq_len - 1) * per_token)))
    stride = (len(ids_T) - seq_len) // max(num - 1, 1)
    if stride < seq_len // 2:
        raise ValueError(f"split {split!r} is {len(ids_T)} tokens long: too few for {num} windows of {seq_len}")
    starts = [i * stride for i in range(num)]
    return EvalSet(*(torch.stack([t[s : s + seq_len] for s in starts]) for t in (ids_T, scored_T, bytes_T)))


def _text_stream(tokenizer: CheckpointTokenizer, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids_T, scored_T, bytes_T) of every file of `split`, each encoded then followed by EOS."""
    root, parts = corpus.stdlib_root(), []
    for f in corpus.split_files(split):
        text = (root / f.rel).read_bytes().decode("utf-8")
        if text:
            parts.append(encode_document(tokenizer, text, f"{split} file {f.rel}"))
    return tuple(torch.from_numpy(np.concatenate(column)) for column in zip(*parts))


def encode_document(tokenizer: CheckpointTokenizer, text: str, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, scored, bytes) of one document: its tokens with the tokenizer's special tokens, then EOS
    (when the tokenizer has one and did not add it). A text token covers the characters from the
    furthest end of the tokens before it to its own end, so a character split over several tokens
    (byte-level BPE) counts once, on the token that completes it; the bytes sum to the text's."""
    hf = tokenizer.hf
    if not hf.is_fast:
        raise ModelError(f"{tokenizer.name}: bits per byte needs a fast tokenizer (tokenizer.json) to tell which "
                         f"text each token covers; save it with tokenizer.json (PreTrainedTokenizerFast)")
    enc = hf(text, add_special_tokens=True, return_offsets_mapping=True, return_special_tokens_mask=True, verbose=False)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    special = np.asarray(enc["special_tokens_mask"], dtype=bool)
    spans = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    _check_faithful(tokenizer, text, ids, special, spans, where)
    if hf.eos_token_id is not None and (len(ids) == 0 or ids[-1] != hf.eos_token_id):
        ids, special = np.append(ids, hf.eos_token_id), np.append(special, True)
        spans = np.append(spans, [[len(text), len(text)]], axis=0)
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    char_bytes = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
    cum = np.concatenate([[0], np.cumsum(char_bytes)])
    covered = np.maximum.accumulate(np.where(special, 0, spans[:, 1]))
    nbytes = cum[covered] - cum[np.concatenate([[0], covered[:-1]])]
    nbytes[np.flatnonzero(~special)[-1]] += cum[-1] - cum[covered[-1]]  # text after the last token's end
    return ids, ~special, nbytes


def _check_faithful(tokenizer: CheckpointTokenizer, text: str, ids: np.ndarray, special: np.ndarray,
                    spans: np.ndarray, where: str) -> None:
    hf = tokenizer.hf
    unk = (ids == hf.unk_token_id) & ~special if hf.unk_token_id is not None else np.zeros(len(ids), bool)
    if unk.any():
        start, end = spans[np.flatnonzero(unk)[0]]
        raise ModelError(f"{tokenizer.name} cannot encode the evaluation text: it maps {int(unk.sum())} pieces of "
                         f"{where} to its unknown token {hf.unk_token!r}, the first {text[start:end]!r} at "
                         f"character {start}, so bits per byte would score the unknown token, not the text; {FAITHFUL}")
    decoded = hf.decode(ids.tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if decoded != text:
        at = next((i for i, (a, b) in enumerate(zip(decoded, text)) if a != b), min(len(decoded), len(text)))
        raise ModelError(f"{tokenizer.name} does not round-trip the evaluation text: decoding its tokens of {where} "
                         f"gives {decoded[at:at + 24]!r} where the text has {text[at:at + 24]!r} (character {at}), "
                         f"so its tokens do not stand for the text's bytes and bits per byte would be meaningless; "
                         f"{FAITHFUL}")


@functools.lru_cache(maxsize=1)
def _check_corpus() -> None:
    """Warn once when this Python's stdlib is not the corpus the bundled models were trained on."""
    path = WEIGHTS_DIR / "manifest.json"
    if not path.is_file():
        return
    want = json.loads(path.read_text()).get("corpus", {})
    if want and want.get("fingerprint") != corpus.fingerprint():
        warnings.warn(f"the installed Python's stdlib (Python {want.get('python')} expected) differs from the "
                      "corpus the bundled models were trained on; held-out figures are not comparable to the "
                      "manifest's", stacklevel=3)


def _module(model: ModelRef) -> nn.Module:
    return load_model(model) if isinstance(model, str) else model.eval()


@torch.no_grad()
def _logits(model: nn.Module, ids_NS: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(ids_BS, logits_BSV) per batch of windows, teacher-forced with transformers' forward."""
    for ids_BS in ids_NS.split(EVAL_BATCH):
        yield ids_BS, model(input_ids=ids_BS, use_cache=False).logits.float()


def scored_bits(logits_BSV: torch.Tensor, ids_BS: torch.Tensor, scored_BS: torch.Tensor | None = None) -> tuple[float, int]:
    """(sum of -log2 p over scored targets, number of scored targets) of one batch; by default the
    byte-level targets, those that are bytes (id < 256)."""
    scored = (ids_BS < 256 if scored_BS is None else scored_BS)[:, 1:]
    logp = F.log_softmax(logits_BSV[:, :-1].double(), dim=-1)
    nll = -logp.gather(-1, ids_BS[:, 1:, None])[..., 0]
    return float(nll[scored].sum()) / math.log(2), int(scored.sum())


def batch_size(seq_len: int, vocab: int) -> int:
    """Windows per forward: EVAL_BATCH, fewer when [B, S, V] logits would pass LOGITS_BUDGET."""
    return max(1, min(EVAL_BATCH, LOGITS_BUDGET // (seq_len * vocab)))


def text_tokenizer(model: ModelRef, module: nn.Module) -> Tokenizer:
    """The tokenizer that turns the evaluation text into MODEL's ids; an error when it has none.
    A module given directly is byte-level unless its config says otherwise."""
    config = getattr(module, "config", None)
    if isinstance(model, str):
        tokenizer = model_tokenizer(model, config)
    else:
        tokenizer = ByteTokenizer() if config is None or is_byte_vocab(config) else None
    if tokenizer is None:
        raise no_tokenizer(model if isinstance(model, str) else type(module).__name__,
                           getattr(config, "vocab_size", None), "planc eval")
    return tokenizer


def bits_per_byte(model: ModelRef = "tiny-deepseek", split: str = "heldout", max_bytes: int | None = None,
                  tokenizer: Tokenizer | None = None) -> float:
    """Held-out bits per byte of a model (bundled name, checkpoint directory or module) on its own,
    its text encoded by `tokenizer` (default: the model's own, see text_tokenizer)."""
    module = _module(model)
    data = eval_set(tokenizer or text_tokenizer(model, module), split, max_bytes)
    vocab = getattr(getattr(module, "config", None), "vocab_size", None) or 1
    bits = 0.0
    with torch.no_grad():
        for batch in data.batches(batch_size(data.ids.shape[1], vocab)):
            bits += scored_bits(module(input_ids=batch.ids, use_cache=False).logits.float(), batch.ids, batch.scored)[0]
    return bits / data.num_bytes()


def draft_agreement(draft: ModelRef = "tiny-draft", target: ModelRef = "tiny-deepseek", split: str = "heldout",
                    max_bytes: int | None = None) -> float:
    """Share of positions where the draft's top-1 next token equals the target's (greedy acceptance)."""
    ids = eval_ids(split, max_bytes)
    draft_top = torch.cat([l[:, :-1].argmax(-1).flatten() for _, l in _logits(_module(draft), ids)])
    target_top = torch.cat([l[:, :-1].argmax(-1).flatten() for _, l in _logits(_module(target), ids)])
    return float((draft_top == target_top).double().mean())


# -- structure of the trained weights ---------------------------------------------------------


@contextmanager
def _capture(model: nn.Module, suffix: str, pick) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Collect pick(output) of every module whose name ends with `suffix`, keyed by its parent's FQN."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if name.endswith(suffix):
            fqn = name[: -len(suffix)]
            seen[fqn] = []
            handles.append(module.register_forward_hook(lambda m, a, out, fqn=fqn: seen[fqn].append(pick(out))))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def hotness(counts_VE: torch.Tensor, k: int, min_occurrences: int = MIN_OCCURRENCES) -> float:
    """Median over token ids seen >= min_occurrences times of the share of their routings that go
    to their k most chosen experts. counts_VE[v, e]: how often token v was routed to expert e."""
    totals = counts_VE.sum(-1)
    frequent = totals >= min_occurrences * k
    if not bool(frequent.any()):
        raise ValueError(f"no token id occurs {min_occurrences} times; evaluate on more text (max_bytes)")
    shares = counts_VE[frequent].topk(k, dim=-1).values.sum(-1) / totals[frequent]
    return statistics.median(shares.tolist())


def topk_hotness(model: ModelRef = "tiny-deepseek", split: str = "heldout", max_bytes: int | None = None,
                 min_occurrences: int = MIN_OCCURRENCES) -> dict[str, float]:
    """Per MoE layer (FQN of the block holding the router `gate`): see `hotness`."""
    module, ids = _module(model), eval_ids(split, max_bytes)
    with _capture(module, ".gate", lambda out: out[-1]) as picks:  # router output: (..., topk_indices [N, K])
        for _ in _logits(module, ids):
            pass
    picks = {fqn: p for fqn, p in picks.items() if p}
    result = {}
    for fqn, chunks in picks.items():
        topk_NK = torch.cat(chunks)
        num_experts = module.get_submodule(f"{fqn}.gate").e_score_correction_bias.numel()
        counts_VE = torch.zeros(module.config.vocab_size, num_experts, dtype=torch.long)
        token_N = ids.flatten()[:, None].expand_as(topk_NK)
        counts_VE.index_put_((token_N.flatten(), topk_NK.flatten()), torch.ones(topk_NK.numel(), dtype=torch.long), accumulate=True)
        result[fqn] = hotness(counts_VE, topk_NK.shape[-1], min_occurrences)
    return result


def top_half_energy(x_NC: torch.Tensor) -> float:
    """Share of the covariance's total variance held by its largest C/2 eigenvalues."""
    eig = torch.linalg.eigvalsh(torch.cov(x_NC.double().T)).flip(0).clamp(min=0)
    return float(eig[: len(eig) // 2].sum() / eig.sum())


def latent_top_half_energy(model: ModelRef = "tiny-deepseek", split: str = "heldout",
                           max_bytes: int | None = None) -> dict[str, float]:
    """Per MLA layer (attention FQN): top_half_energy of the normalized latent c_kv (the output of
    kv_a_layernorm, what the MLA cache holds) over every held-out token."""
    module, ids = _module(model), eval_ids(split, max_bytes)
    with _capture(module, ".kv_a_layernorm", lambda out: out.detach().flatten(0, -2)) as latents:
        for _ in _logits(module, ids):
            pass
    return {fqn: top_half_energy(torch.cat(chunks)) for fqn, chunks in latents.items() if chunks}


# -- compiled artifacts -----------------------------------------------------------------------


def artifact_bits_per_byte(artifact: str | Path, nproc: int | None = None, *, split: str = "heldout",
                           max_bytes: int | None = None, kernels: str = "torch", timeout_s: float = 600) -> float:
    """Bits per byte of a compiled artifact run on its ranks (nproc: the artifact's world size), the
    text encoded by the tokenizer it was compiled with."""
    from planc.models.tokenizer import artifact_tokenizer
    from planc.runtime.artifact import open_artifact
    from planc.runtime.launch import launch

    opened = open_artifact(Path(artifact))
    manifest = opened.manifest
    tokenizer = artifact_tokenizer(manifest, opened.tokenizer_dir())
    if tokenizer is None:
        raise no_tokenizer(f"{artifact} (compiled from {manifest['model']['source']})",
                           manifest["model"]["vocab_size"], "planc eval")
    data = eval_set(tokenizer, split, max_bytes)
    nproc = nproc or manifest["world_size"]
    args = {"artifact": str(artifact), "ids": data.ids.tolist(), "scored": data.scored.tolist(), "kernels": kernels,
            "batch": batch_size(data.ids.shape[1], manifest["model"]["vocab_size"])}
    if nproc == 1:
        from planc.runtime.comm import Comm

        result = _artifact_bits(args, Comm.single())
    else:
        result = launch("planc.zoo.eval:artifact_worker", args, nproc, timeout_s=timeout_s)[0]
    return result["bits"] / data.num_bytes()


def artifact_worker(args: dict) -> None:
    """Per-rank entry of artifact_bits_per_byte: every rank runs every forward (the collectives need
    all of them) and reports its sums; the caller reads rank 0's."""
    from planc.runtime.comm import Comm
    from planc.runtime.launch import write_result

    write_result(_artifact_bits(args, Comm() if dist.is_initialized() else Comm.single()))


@torch.no_grad()
def _artifact_bits(args: dict, comm) -> dict:
    from planc.runtime.model import Model

    rank = Model(args["artifact"], comm=comm, kernels=args["kernels"])
    bits = 0.0
    for ids_BS, scored_BS in zip(torch.tensor(args["ids"]).split(args["batch"]),
                                 torch.tensor(args["scored"]).split(args["batch"])):
        B, S = ids_BS.shape
        rank.allocate(B, S)
        step = Step(0, torch.arange(S).expand(B, S), torch.ones(B, S, dtype=torch.bool))
        bits += scored_bits(rank.forward(ids_BS, step).float(), ids_BS, scored_BS)[0]
    return {"bits": bits}
