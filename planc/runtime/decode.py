"""The generate loop and the decode strategies it drives (which token to take from a step's logits).

A strategy is an object with `pick(logits_BV) -> tokens_B`, and for speculative decoding
`verify(target_BGV, draft_BGV, draft_BG) -> (accepted_B, next_B)`; the loops (here and
planc.runtime.speculative) own the models, their caches, stopping at EOS and timing, and never
look inside the strategy. Every rank runs the same loop on the same logits with the same seed, so
every rank picks the same tokens.

Legend: B batch rows, V vocabulary, P padded prompt width, G draft tokens per round (G + 1 target
positions: one per draft token, then the bonus).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from planc.errors import RunError
from planc.runtime.model import Model


class Strategy(Protocol):
    def pick(self, logits_BV: torch.Tensor) -> torch.Tensor: ...

    def verify(self, target_BGV: torch.Tensor, draft_BGV: torch.Tensor,
               draft_BG: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class Greedy:
    def pick(self, logits_BV: torch.Tensor) -> torch.Tensor:
        return logits_BV.argmax(dim=-1)

    def verify(self, target_BGV: torch.Tensor, draft_BGV: torch.Tensor,
               draft_BG: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Accept draft tokens while they are the target's argmax; the next token is the target's
        argmax after the last accepted one (the bonus when all are)."""
        best_BG = target_BGV.argmax(dim=-1)
        accepted_B = _leading(best_BG[:, :-1] == draft_BG)
        return accepted_B, best_BG.gather(1, accepted_B[:, None])[:, 0]


def _leading(ok_BG: torch.Tensor) -> torch.Tensor:
    """How many leading True each row has."""
    return ok_BG.long().cumprod(dim=-1).sum(dim=-1)


@dataclass
class Sampling:
    """Softmax sampling at `temperature` among the top_k logits (0: all); one seeded stream."""

    temperature: float = 1.0
    top_k: int = 0
    seed: int = 0
    _gen: torch.Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.temperature <= 0 or self.top_k < 0:
            raise RunError(f"sampling temperature={self.temperature}, top_k={self.top_k}: the temperature must be "
                           f"> 0 (use greedy decoding for 0) and top_k >= 0 (0 = no cut)")
        self._gen = torch.Generator().manual_seed(self.seed)

    def probs(self, logits_V: torch.Tensor) -> torch.Tensor:
        """The distribution tokens are drawn from, over the last dim."""
        logits = logits_V.float() / self.temperature
        if self.top_k:
            kth = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.softmax(logits, dim=-1)

    def pick(self, logits_BV: torch.Tensor) -> torch.Tensor:
        return torch.multinomial(self.probs(logits_BV), 1, generator=self._gen).flatten()

    def verify(self, target_BGV: torch.Tensor, draft_BGV: torch.Tensor,
               draft_BG: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Speculative sampling: accept draft token i with probability min(1, p_i/q_i); at the first
        rejection draw from norm(max(0, p - q)), after G acceptances the bonus from p_G. The tokens
        emitted are distributed as the target's own samples (Leviathan et al., 2023)."""
        B, G = draft_BG.shape
        p_BGV, q_BGV = self.probs(target_BGV), self.probs(draft_BGV)
        p_BG = p_BGV[:, :G].gather(-1, draft_BG[..., None])[..., 0]
        q_BG = q_BGV.gather(-1, draft_BG[..., None])[..., 0]
        u_BG = torch.rand(B, G, generator=self._gen)
        accepted_B = _leading(u_BG * q_BG < p_BG)
        q_BGV = torch.cat([q_BGV, q_BGV.new_zeros(B, 1, q_BGV.shape[-1])], dim=1)  # no draft after the last
        at_B = accepted_B[:, None, None].expand(B, 1, p_BGV.shape[-1])
        p_BV, q_BV = p_BGV.gather(1, at_B)[:, 0], q_BGV.gather(1, at_B)[:, 0]
        residual_BV = (p_BV - q_BV).clamp(min=0)
        residual_BV = torch.where(residual_BV.sum(-1, keepdim=True) > 0, residual_BV, p_BV)
        return accepted_B, torch.multinomial(residual_BV, 1, generator=self._gen).flatten()


def choose_strategy(temperature: float = 0.0, top_k: int = 0, seed: int = 0) -> Greedy | Sampling:
    """The strategy `planc run --temperature/--top-k/--seed` asks for: temperature 0 is greedy."""
    return Greedy() if temperature == 0 else Sampling(temperature, top_k, seed)


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt (stopped rows end at their EOS)
    step_logits: list[torch.Tensor] = field(default_factory=list)  # [B, V] per generated token
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0  # target forwards after the prefill (speculative: one per round)
    speculation: dict | None = None  # the speculative loop's figures (planc.runtime.speculative)


def batches(prompts: list[list[int]], batch_size: int | None) -> list[list[list[int]]]:
    """The prompts batch_size at a time, in order (None: all in one batch)."""
    size = batch_size or len(prompts)
    return [prompts[i:i + size] for i in range(0, len(prompts), size)]


def concat(parts: list[Generation]) -> Generation:
    """Batches decoded one after another as one Generation: rows in order, seconds and steps summed,
    each step's logits side by side (zeros for the rows of a batch that had stopped). Speculation
    figures are the caller's to combine (planc.runtime.speculative.combined)."""
    if len(parts) == 1:
        return parts[0]
    out = Generation([t for p in parts for t in p.tokens], prefill_s=sum(p.prefill_s for p in parts),
                     decode_s=sum(p.decode_s for p in parts), decode_steps=sum(p.decode_steps for p in parts))
    steps = max(len(p.step_logits) for p in parts)
    if steps:
        V = next(p.step_logits[0].shape[-1] for p in parts if p.step_logits)
        out.step_logits = [torch.cat([p.step_logits[i] if i < len(p.step_logits) else torch.zeros(len(p.tokens), V)
                                      for p in parts]) for i in range(steps)]
    return out


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_BP, real_BP): prompts right-aligned, padding marked False."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    real = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        real[row, width - len(p):] = True
    return ids, real


@torch.no_grad()
def generate(model: Model, prompts: list[list[int]], max_new_tokens: int, strategy: Strategy = Greedy(), *,
             eos_id: int | list[int] | None = None, pad_id: int = 0, keep_logits: bool = False) -> Generation:
    """Prefill all prompts at once, then decode one token per row per step until every row has
    max_new_tokens or has emitted an EOS (eos_id: one id, or several as Llama-3-style configs list
    them; its EOS is kept; the other rows go on)."""
    ids_BP, real_BP = left_pad(prompts, pad_id)
    B, P = ids_BP.shape
    model.allocate(B, P + max_new_tokens)
    out = Generation([[] for _ in prompts])
    done_B = torch.zeros(B, dtype=torch.bool)
    eos = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id or []), dtype=torch.long)

    t0 = time.perf_counter()
    with model.comm.phase("prefill"):
        logits_BV = model.extend(ids_BP, real_BP)[:, -1]
    out.prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(max_new_tokens):
        token_B = strategy.pick(logits_BV)
        if keep_logits:
            out.step_logits.append(logits_BV.float().clone())
        for row in (~done_B).nonzero().flatten().tolist():
            out.tokens[row].append(int(token_B[row]))
        done_B |= torch.isin(token_B, eos)
        if i == max_new_tokens - 1 or bool(done_B.all()):
            break
        with model.comm.phase("decode"):
            logits_BV = model.extend(token_B[:, None])[:, -1]
        out.decode_steps += 1
    out.decode_s = time.perf_counter() - t0
    return out
