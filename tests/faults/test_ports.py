"""A rendezvous port in use: the user's own --rdzv-endpoint is refused in one line; a port planc
probed itself and lost to another process before binding it is replaced by a fresh one."""
from __future__ import annotations

import os
import socket
import time

from planc.cli import main
from planc.runtime import launch as launch_module
from planc.runtime.launch import launch
from tests.faults.harness import descendants, one_line


def test_chosen_port_in_use_is_one_line(compiled, capsys):
    artifact = compiled("deepseek_mla_tp_ep.yaml", 2)
    before = descendants(os.getpid())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        code = main(["run", str(artifact), "--rdzv-endpoint", f"127.0.0.1:{port}"])
        seconds = time.monotonic() - start
    line = one_line(capsys.readouterr().err)
    assert code == 2 and seconds < 30, (code, seconds, line)
    assert line == (f"planc run: error: rendezvous endpoint 127.0.0.1:{port} is in use by another process "
                    f"(EADDRINUSE); pass a free port with --rdzv-endpoint HOST:PORT, or leave it out on one "
                    f"machine and planc picks one")
    assert descendants(os.getpid()) == before  # no rank was started


def test_probed_port_taken_before_the_agent_binds_it_is_retried(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = [taken.getsockname()[1]]  # the first probe "loses the race": its port is taken
        probe = launch_module._free_port

        def racing_probe() -> int:
            ports.append(probe())
            return ports[-2]

        monkeypatch.setattr(launch_module, "_free_port", racing_probe)
        results = launch("tests.runtime.workers:echo", {"word": "again"}, 2, timeout_s=90, backend="gloo")
    assert len(ports) == 3  # two probes: the taken port, then a free one
    assert results == [{"rank": 0, "args": {"word": "again"}, "gloo_ifname": "lo"}, None]
