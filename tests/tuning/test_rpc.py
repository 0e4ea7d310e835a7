"""Tuning through TVM's own RPC tracker and server on localhost (``autotune --rpc-tracker``)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tvm_splat.cli import main
from tvm_splat.tuning.tune import RPCTracker, measure_runner

KEY = "tvm-splat-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(*args):
    return subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


@pytest.fixture
def tracker():
    """A tracker and one CPU server registered under ``KEY``; both stopped afterwards. The server
    runs with ``--no-fork`` (a spawned process per session), as the documented command does."""
    pytest.importorskip("tornado")  # the tracker's own dependency
    port = _free_port()
    procs = [_start("tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1))]
    procs.append(_start("tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{port}", "--key", KEY, "--host", "127.0.0.1",
                        "--port", str(_free_port()), "--port-end", "65000", "--no-fork"))
    rpc = RPCTracker.parse(f"127.0.0.1:{port}", KEY)
    deadline = time.monotonic() + 60
    while True:
        try:
            if rpc.servers() == 1:
                break
        except Exception:  # the tracker is not listening yet
            pass
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            pytest.fail("the RPC tracker and server did not start")
        time.sleep(0.5)
    yield rpc
    for p in procs:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=30)


def test_autotune_measures_on_the_rpc_server(tracker, tmp_path, capsys):
    """Two trials through the server. Sessions get 40 s: the first session of a run hung here
    until its timeout in every run (see ``RPCTracker``); the best record must still be measured."""
    argv = ["autotune", "--pattern", "window:3", "--seq", "32", "--heads", "1", "--head-dim", "8", "--dtype", "float32",
            "--target", "llvm", "--variant", "row", "--trials", "2", "--log-dir", str(tmp_path),
            "--rpc-tracker", f"{tracker.host}:{tracker.port}", "--rpc-key", KEY, "--rpc-timeout", "40"]
    assert main(argv) == 0
    (records,) = tmp_path.glob("llvm/row_*/database_tuning_record.json")
    run_secs = json.loads(records.read_text().splitlines()[0])[1][1]
    assert run_secs and all(0 < float(s) < 1 for s in run_secs)  # measured, not the error marker 1e10
    assert "row/row: best" in capsys.readouterr().out


def test_rpc_runner_needs_a_server_under_the_key(tracker):
    with pytest.raises(ValueError, match="no server under key 'other'"):
        measure_runner(None, RPCTracker(tracker.host, tracker.port, "other"))


@pytest.mark.parametrize("address,key,why", [("localhost", "k", "HOST:PORT"), ("h:0", "k", "HOST:PORT"),
                                             ("h:9190", "", "--rpc-key")])
def test_rpc_tracker_arguments_are_checked(address, key, why):
    with pytest.raises(ValueError, match=why):
        RPCTracker.parse(address, key)


def test_rpc_flags_go_together():
    with pytest.raises(SystemExit, match="go together"):
        main(["autotune", "--rpc-tracker", "127.0.0.1:9190", "--target", "llvm"])
