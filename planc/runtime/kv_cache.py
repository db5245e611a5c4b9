"""One rank's KV cache for one program: the per-layer buffers and which slots hold real tokens.

Slots are shared by the whole batch: prompts are left-padded, so every row's newest token sits in
the same slot and a step writes slots [length, length + S) for all rows at once. Padded slots are
masked out of attention; a row's rope position is the number of real tokens before it, so the
positions follow from the mask and a rollback (truncate) needs nothing else restored. Speculative
decoding rolls rows back by different amounts (`reject`): a row's rejected slots become holes,
masked like padding, and the slots no row keeps are freed.

A slot written by a layer-parallel draft forward is fuzzy (computed from a group's input rather
than the layer's own); `fuzzy_T` marks them until they are truncated away.

Legend: B batch, T capacity (slots), S tokens this step.
"""
from __future__ import annotations

import torch

from planc.ops import GqaCache, MlaCache, Step


class KvCache:
    """`layers` is the per-layer dict the generated program indexes as rt.kv[fqn]."""

    def __init__(self, specs: dict[str, dict], dtype: torch.dtype, rank: int = 0, device: torch.device | str = "cpu"):
        # a layer placed on one rank (an EasySpec draft's grouped attention) is cached there alone
        self.specs = {fqn: spec for fqn, spec in specs.items() if spec.get("rank", rank) == rank}
        self.dtype = dtype
        self.device = torch.device(device)
        self.layers: dict[str, MlaCache | GqaCache] = {}
        self.key_mask_BT = torch.zeros(0, 0, dtype=torch.bool)
        self.fuzzy_T = torch.zeros(0, dtype=torch.bool)
        self.ids_BT = torch.zeros(0, 0, dtype=torch.long)  # the token in each slot (CPU), for a re-read
        self.length = 0  # slots in use

    def allocate(self, batch: int, capacity: int) -> None:
        """Empty buffers of [batch, capacity, ...] per attention layer."""
        self.layers = {fqn: _buffers(spec, batch, capacity, self.dtype, self.device) for fqn, spec in self.specs.items()}
        self.key_mask_BT = torch.zeros(batch, capacity, dtype=torch.bool, device=self.device)
        self.fuzzy_T = torch.zeros(capacity, dtype=torch.bool, device=self.device)
        self.ids_BT = torch.zeros(batch, capacity, dtype=torch.long)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.key_mask_BT.shape[1]

    def next_pos_B(self) -> torch.Tensor:
        """Each row's rope position for its next real token (= real tokens cached so far)."""
        return self.key_mask_BT[:, :self.length].sum(-1)

    def step(self, real_BS: torch.Tensor) -> Step:
        """The Step that writes the next S tokens; real_BS is False for padding (left, at prefill)."""
        B, S = real_BS.shape
        real_BS = real_BS.to(self.device)
        end = self.length + S
        if B != self.key_mask_BT.shape[0] or end > self.capacity:
            raise ValueError(f"KvCache.step: {B} rows x {S} tokens after slot {self.length} do not fit a cache "
                             f"of {self.key_mask_BT.shape[0]} rows x {self.capacity} slots")
        self.key_mask_BT[:, self.length:] = False
        self.key_mask_BT[:, self.length:end] = real_BS
        pos_BS = (self.next_pos_B()[:, None] + real_BS.long().cumsum(-1) - 1).clamp(min=0)
        return Step(self.length, pos_BS, self.key_mask_BT)

    def advance(self, num_tokens: int, *, fuzzy: bool = False) -> None:
        """Keep the first num_tokens slots the last step wrote (fewer: the rest are dropped)."""
        if not 0 <= num_tokens <= self.capacity - self.length:
            raise ValueError(f"KvCache.advance({num_tokens}): {self.length} of {self.capacity} slots in use")
        self.fuzzy_T[self.length:self.length + num_tokens] = fuzzy
        self.length += num_tokens
        self.key_mask_BT[:, self.length:] = False

    def reject(self, start: int, keep_BS: torch.Tensor) -> None:
        """Per row, forget the last S slots [start, length) that keep_BS marks False (they become
        holes); the trailing slots no row keeps are freed."""
        S = keep_BS.shape[1]
        if start < 0 or start + S != self.length:
            raise ValueError(f"KvCache.reject: slots [{start}, {start + S}) are not the last ones in use "
                             f"(length {self.length})")
        keep_BS = keep_BS.to(self.device)
        self.key_mask_BT[:, start:start + S] &= keep_BS
        kept = keep_BS.any(0).nonzero()
        self.truncate(start + (int(kept[-1]) + 1 if len(kept) else 0))

    def truncate(self, length: int) -> None:
        """Roll back to the first `length` slots (rejected speculative tokens are forgotten)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"KvCache.truncate({length}): only {self.length} slots are in use")
        self.length = length
        self.key_mask_BT[:, length:] = False
        self.fuzzy_T[length:] = False

    def fuzzy_slots(self) -> int:
        """Slots in use written by a layer-parallel forward."""
        return int(self.fuzzy_T[:self.length].sum())


def _buffers(spec: dict, batch: int, capacity: int, dtype: torch.dtype, device: torch.device) -> MlaCache | GqaCache:
    if spec["kind"] == "mla":
        return MlaCache(torch.zeros(batch, capacity, spec["ckv"], dtype=dtype, device=device),
                        torch.zeros(batch, capacity, spec["kpe"], dtype=dtype, device=device))
    shape = (batch, capacity, spec["kv_heads"], spec["head_dim"])
    return GqaCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
