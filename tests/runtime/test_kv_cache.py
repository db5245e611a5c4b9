"""KvCache: slots, masks and positions; a truncated and refilled cache is the cache never rolled back."""
from __future__ import annotations

import pytest
import torch

from planc.models.tokenizer import encode
from planc.runtime.decode import left_pad
from planc.runtime.kv_cache import KvCache
from planc.runtime.model import Model

SPECS = {"a": {"kind": "mla", "ckv": 4, "kpe": 2}, "b": {"kind": "gqa", "kv_heads": 2, "head_dim": 3}}
PROMPTS = [encode("def add(a, b):"), encode("x = [")]  # different lengths: the second is left-padded


def _bytes(*texts: str) -> torch.Tensor:
    """Continuation tokens (no BOS): one row per text, the byte-level ids of the bundled models."""
    return torch.tensor([list(t.encode()) for t in texts])


def _cache(batch: int = 2, capacity: int = 8) -> KvCache:
    cache = KvCache(SPECS, torch.float32)
    cache.allocate(batch, capacity)
    return cache


def test_allocate_builds_each_layer_from_its_spec():
    cache = _cache()
    assert cache.layers["a"].ckv_BTC.shape == (2, 8, 4) and cache.layers["a"].kpe_BTR.shape == (2, 8, 2)
    assert cache.layers["b"].k_BTHD.shape == (2, 8, 2, 3) and cache.layers["b"].v_BTHD.shape == (2, 8, 2, 3)
    assert (cache.length, cache.capacity) == (0, 8)


def test_left_padded_prefill_then_decode_positions_and_mask():
    cache = _cache()
    real = torch.tensor([[True, True, True], [False, True, True]])
    step = cache.step(real)
    assert step.start == 0 and step.pos_BS.tolist() == [[0, 1, 2], [0, 0, 1]]  # padding sits at 0
    cache.advance(3)
    step = cache.step(torch.ones(2, 1, dtype=torch.bool))
    assert step.start == 3 and step.pos_BS.tolist() == [[3], [2]]
    assert step.key_mask_BT[:, :4].tolist() == [[True] * 4, [False, True, True, True]]
    assert not step.key_mask_BT[:, 4:].any()
    cache.advance(1)
    assert cache.length == 4 and cache.next_pos_B().tolist() == [4, 3]


def test_truncate_restores_length_mask_and_positions():
    cache = _cache()
    cache.step(torch.tensor([[True, True], [False, True]]))
    cache.advance(2)
    mask, pos = cache.key_mask_BT.clone(), cache.next_pos_B()
    cache.step(torch.ones(2, 3, dtype=torch.bool))
    cache.advance(3)
    cache.truncate(2)
    assert cache.length == 2 and torch.equal(cache.key_mask_BT, mask) and torch.equal(cache.next_pos_B(), pos)


def test_advance_fewer_than_written_drops_the_rest():
    cache = _cache()
    cache.step(torch.ones(2, 4, dtype=torch.bool))
    cache.advance(1)  # e.g. one of four speculated tokens accepted
    assert cache.length == 1 and cache.key_mask_BT.sum().item() == 2


def test_out_of_range_requests_raise():
    cache = _cache(capacity=4)
    with pytest.raises(ValueError, match="do not fit a cache of 2 rows x 4 slots"):
        cache.step(torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="do not fit"):
        cache.step(torch.ones(3, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="only 0 slots are in use"):
        cache.truncate(1)
    with pytest.raises(ValueError, match="0 of 4 slots in use"):
        cache.advance(5)


# -- on the bundled model: rollback is exact ---------------------------------------------------


@pytest.fixture(scope="module")
def model(compiled) -> Model:
    return Model(compiled("deepseek_mla_tp_ep.yaml", 1))


def _prefill(model: Model, extra: int) -> int:
    ids, real = left_pad(PROMPTS, pad_id=0)
    model.allocate(len(PROMPTS), ids.shape[1] + extra)
    model.extend(ids, real)
    return ids.shape[1]


def _one_by_one(model: Model, tokens_BN: torch.Tensor) -> list[torch.Tensor]:
    return [model.extend(tokens_BN[:, i:i + 1]) for i in range(tokens_BN.shape[1])]


@torch.no_grad()
def test_truncated_and_refilled_cache_gives_the_same_logits(model):
    tokens = _bytes("ret", "1, ")
    P = _prefill(model, extra=8)
    want = _one_by_one(model, tokens)  # filled straight through
    model.cache.truncate(P + 1)
    _one_by_one(model, _bytes("zz?!", "#\n\t~"))  # rejected speculation
    model.cache.truncate(P + 1)
    got = _one_by_one(model, tokens[:, 1:])
    assert model.cache.length == P + 3
    for i, (g, w) in enumerate(zip(got, want[1:])):
        assert torch.equal(g, w), i  # bitwise: the same ops on the same values in the same slots


@torch.no_grad()
def test_a_chunk_after_rollback_equals_the_chunk_without_one(model):
    tokens = _bytes("ret", "1, ")
    P = _prefill(model, extra=8)
    model.extend(tokens[:, :1])
    want = model.extend(tokens[:, 1:])  # two tokens at once, as a speculative verify step
    model.cache.truncate(P + 1)
    _one_by_one(model, _bytes("zzzz", "####"))
    model.cache.truncate(P + 1)
    assert torch.equal(model.extend(tokens[:, 1:]), want)
    model.cache.truncate(0)  # all the way back: the prefill itself
    ids, real = left_pad(PROMPTS, pad_id=0)
    first = model.extend(ids, real)
    model.cache.truncate(0)
    assert torch.equal(model.extend(ids, real), first)


def test_reject_leaves_holes_per_row_and_positions_count_real_tokens():
    cache = _cache(capacity=10)
    cache.step(torch.ones(2, 2, dtype=torch.bool))
    cache.advance(2)
    cache.step(torch.ones(2, 4, dtype=torch.bool))  # a verify step: 4 speculative slots
    cache.advance(4)
    cache.reject(2, torch.tensor([[True, True, False, False], [True, False, False, False]]))
    assert cache.length == 4  # slot 5 is kept by no row: freed; slot 3 is row 1's hole
    assert cache.key_mask_BT[:, :4].tolist() == [[True] * 4, [True, True, True, False]]
    assert cache.step(torch.ones(2, 1, dtype=torch.bool)).pos_BS.tolist() == [[4], [3]]
    cache.advance(1)
    cache.reject(4, torch.zeros(2, 1, dtype=torch.bool))
    assert cache.length == 4
    with pytest.raises(ValueError, match="not the last ones in use"):
        cache.reject(1, torch.ones(2, 2, dtype=torch.bool))


def test_fuzzy_slots_are_marked_until_truncated():
    cache = _cache()
    cache.step(torch.ones(2, 3, dtype=torch.bool))
    cache.advance(3)
    for _ in range(2):
        cache.step(torch.ones(2, 1, dtype=torch.bool))
        cache.advance(1, fuzzy=True)
    assert cache.fuzzy_slots() == 2 and cache.fuzzy_T[:5].tolist() == [False] * 3 + [True] * 2
    cache.truncate(3)
    assert cache.fuzzy_slots() == 0 and not cache.fuzzy_T.any()


def test_a_layer_placed_on_one_rank_is_cached_there_alone():
    specs = {**SPECS, "c": {**SPECS["b"], "rank": 1}}
    assert set(KvCache(specs, torch.float32, rank=0).specs) == {"a", "b"}
    assert set(KvCache(specs, torch.float32, rank=1).specs) == {"a", "b", "c"}


def test_a_cache_on_a_device_keeps_every_buffer_and_step_there():
    # meta stands in for a GPU here: nothing on it can be read back, so a tensor left on the CPU shows.
    cache = KvCache(SPECS, torch.float32, device="meta")
    cache.allocate(2, 8)
    step = cache.step(torch.ones(2, 3, dtype=torch.bool))  # the caller's CPU mask is moved
    tensors = [cache.key_mask_BT, cache.fuzzy_T, step.pos_BS, step.key_mask_BT,
               *(t for layer in cache.layers.values() for t in vars(layer).values())]
    assert {t.device.type for t in tensors} == {"meta"}
