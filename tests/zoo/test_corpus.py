"""The corpus: which files, which split, and the token streams and batches built from them."""
from __future__ import annotations

from dataclasses import replace
from pathlib import PurePosixPath

import torch

from planc.models.registry import BOS_ID, EOS_ID
from planc.zoo import corpus


def test_files_are_sorted_stdlib_sources_without_excluded_dirs():
    files = corpus.files()
    rels = [f.rel for f in files]
    assert rels == sorted(rels) and len(rels) == len(set(rels))
    assert len(files) > 300  # 475 on Python 3.11.7
    for rel in rels:
        path = PurePosixPath(rel)
        assert path.suffix == ".py" and not set(path.parts[:-1]) & corpus.EXCLUDED_DIRS, rel
    assert {"os.py", "asyncio/events.py", "json/decoder.py"} <= set(rels)
    assert not any(r.startswith(("test/", "idlelib/", "lib2to3/", "encodings/")) for r in rels)


def test_splits_partition_the_files_by_path_hash():
    by_split = {s: {f.rel for f in corpus.split_files(s)} for s in corpus.SPLITS}
    assert all(by_split.values())
    assert sum(map(len, by_split.values())) == len(corpus.files())
    assert set.union(*by_split.values()) == {f.rel for f in corpus.files()}
    # The rule is sha256 of the path alone: these assignments never change.
    assert [corpus.split_of(r) for r in ("os.py", "typing.py", "json/decoder.py")] == ["train", "heldout", "train"]
    assert all(corpus.split_of(f.rel) == "heldout" for f in corpus.split_files("heldout"))


def test_stream_is_bos_bytes_eos_per_file_in_path_order():
    files = corpus.split_files("heldout")
    tokens = corpus.stream("heldout")
    assert tokens.dtype == torch.int16
    assert len(tokens) == sum(f.size + 2 for f in files)
    assert int((tokens == BOS_ID).sum()) == int((tokens == EOS_ID).sum()) == len(files)
    first = (corpus.stdlib_root() / files[0].rel).read_bytes()
    assert int(tokens[0]) == BOS_ID and int(tokens[len(first) + 1]) == EOS_ID
    assert bytes(tokens[1 : len(first) + 1].tolist()) == first


def test_batches_are_fixed_by_seed_and_step():
    a = corpus.batch("train", 7, 4, 32, seed=0)
    assert a.shape == (4, 32) and a.dtype == torch.long
    assert torch.equal(a, corpus.batch("train", 7, 4, 32, seed=0))
    assert not torch.equal(a, corpus.batch("train", 8, 4, 32, seed=0))
    assert not torch.equal(a, corpus.batch("train", 7, 4, 32, seed=1))


def test_eval_windows_are_fixed_and_spread_over_the_split():
    w = corpus.windows("heldout", 8, 64)
    assert torch.equal(w, corpus.windows("heldout", 8, 64))
    stream = corpus.stream("heldout")
    stride = (len(stream) - 64) // 7
    assert torch.equal(w[0], stream[:64].long()) and torch.equal(w[7], stream[7 * stride : 7 * stride + 64].long())
    assert 7 * stride + 64 > len(stream) - 8  # the last window reaches the end of the split


def test_fingerprint_is_stable_and_tracks_the_file_list(monkeypatch):
    before = corpus.fingerprint()
    corpus.files.cache_clear()  # walk the stdlib again: the same install gives the same hash
    assert corpus.fingerprint() == before and len(before) == 64 and set(before) <= set("0123456789abcdef")
    listed = corpus.files()
    grown = listed[:1] + (replace(listed[1], size=listed[1].size + 1),) + listed[2:]
    renamed = (replace(listed[0], rel="x" + listed[0].rel),) + listed[1:]
    changed = {"one file dropped": listed[1:], "one file one byte longer": grown, "one file renamed": renamed,
               "a file added": listed + (replace(listed[-1], rel="zz_new.py"),)}
    for what, files in changed.items():
        monkeypatch.setattr(corpus, "files", lambda files=files: files)
        assert corpus.fingerprint() != before, what
    monkeypatch.setattr(corpus, "files", lambda: tuple(replace(f) for f in listed))  # equal list, new objects
    assert corpus.fingerprint() == before
