"""A broken artifact never runs: `planc run` and `planc verify` refuse each tampering before any
rank starts (or the reference model loads), exit 2 with one line naming the file and saying to
recompile, within seconds, and leave nothing behind."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from planc.cli import main

WEIGHTS = "programs/target/weights/rank{}.safetensors"
PROGRAM = "programs/target/program.py"
SECONDS = 10  # hashing ~5 MB; launching two ranks alone takes longer on these CPUs


def _edit_program(art: Path) -> str:
    (art / PROGRAM).write_text((art / PROGRAM).read_text() + "print('added line')\n")
    return f"{PROGRAM}: sha256"


def _flip_weight_byte(art: Path) -> str:
    path = art / WEIGHTS.format(1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return f"{WEIGHTS.format(1)}: sha256"


def _truncate_weights(art: Path) -> str:
    path = art / WEIGHTS.format(0)
    path.write_bytes(path.read_bytes()[:-100])
    return f"{WEIGHTS.format(0)}: sha256"


def _remove_kernel(art: Path) -> str:
    (art / "kernels" / "rmsnorm.py").unlink()
    return "kernels/rmsnorm.py is missing (listed in manifest.json)"


def _add_foreign_file(art: Path) -> str:
    (art / "programs" / "target" / "helper.py").write_text("import os\n")
    return "programs/target/helper.py: not listed in manifest.json"


def _add_foreign_rank(art: Path) -> str:
    shutil.copy(art / WEIGHTS.format(0), art / WEIGHTS.format(2))
    return f"{WEIGHTS.format(2)}: not listed in manifest.json"


def _edit_world_size(art: Path) -> str:
    manifest = json.loads((art / "manifest.json").read_text())
    (art / "manifest.json").write_text(json.dumps({**manifest, "world_size": 4}, indent=1))
    return "manifest.json: edited since it was compiled"


def _reseal_program_by_hand(art: Path) -> str:
    """The file's new hash written into the manifest, as someone patching an artifact would."""
    import hashlib

    _edit_program(art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["files"][PROGRAM] = hashlib.sha256((art / PROGRAM).read_bytes()).hexdigest()
    (art / "manifest.json").write_text(json.dumps(manifest))
    return "manifest.json: edited since it was compiled"


def _manifest_not_json(art: Path) -> str:
    (art / "manifest.json").write_text('{"format_version": 3, "files": ')
    return "manifest.json:1:32: not valid JSON (Expecting value)"


def _manifest_deeply_nested(art: Path) -> str:
    (art / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    return "manifest.json: not JSON planc can read"


def _manifest_huge_number(art: Path) -> str:
    (art / "manifest.json").write_text('{"world_size": ' + "9" * 5000 + "}")
    return "manifest.json: not JSON planc can read"


def _manifest_not_utf8(art: Path) -> str:
    (art / "manifest.json").write_bytes(b'{"a": "\xff"}')
    return "manifest.json: not UTF-8 (byte 0xff at offset 7)"


TAMPERING = [_edit_program, _flip_weight_byte, _truncate_weights, _remove_kernel, _add_foreign_file, _add_foreign_rank,
             _edit_world_size, _reseal_program_by_hand, _manifest_not_json, _manifest_deeply_nested,
             _manifest_huge_number, _manifest_not_utf8]


@pytest.fixture
def never_launch(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a rank was launched or the reference model loaded")

    monkeypatch.setattr("planc.run.launch", refuse)
    monkeypatch.setattr("planc.verify.launch", refuse)
    monkeypatch.setattr("planc.verify.reference_generate", refuse)


@pytest.mark.parametrize("command", ["run", "verify"])
@pytest.mark.parametrize("tamper", TAMPERING, ids=lambda f: f.__name__.lstrip("_"))
def test_tampering_is_refused_before_any_rank_starts(compiled, tmp_path, capsys, never_launch, command, tamper):
    art = shutil.copytree(compiled("deepseek_mla_tp_ep.yaml", 2), tmp_path / "art")
    said = tamper(art)
    started = time.monotonic()
    code = main([command, str(art), "--max-new-tokens", "2"])
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith(f"planc {command}: error: {art}"), err
    assert said in err and "recompile it with `planc compile`" in err, err
    assert elapsed < SECONDS
    assert [p.name for p in tmp_path.iterdir()] == ["art"]
