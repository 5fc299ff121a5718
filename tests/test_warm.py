"""The warm launcher (``lguest-jit server``, lguest_jit/warm.py): a client
hands its run to the server, which forks a child that runs exactly what the
client would have; status, output, signals and refusals behave as without
a server.  Tiny KVM guests stand in for Linux."""
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from lguest_jit import warm
from lguest_jit.hw.kvm import kvm_available
from lguest_jit.hw.tinyguest import Asm
from test_cli_run import LOAD, REQUEST, _elf64, _guest

needs_kvm = pytest.mark.skipif(kvm_available() is not None, reason=f"KVM unusable: {kvm_available()}")
LAUNCHER = [sys.executable, "-m", "lguest_jit.main"]


def _env(sock, **extra):
    env = {**os.environ, "LGUEST_JIT_SERVER": str(sock), **extra}
    env.pop("NUMBA_DISABLE_JIT", None)
    return env


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server on a private socket, ready; stopped with SIGTERM at the end."""
    sock = tmp_path_factory.mktemp("warm") / "s.sock"
    proc = subprocess.Popen([*LAUNCHER, "server", f"--socket={sock}"], env=_env(sock), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()                       # "ready on ..." after the warm-up
    assert "ready on" in line, line + proc.stderr.read()
    yield proc, sock
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert not sock.exists()                            # the socket goes with the server


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def test_socket_is_private_and_a_second_server_is_refused(server):
    proc, sock = server
    assert stat.S_ISSOCK(os.stat(sock).st_mode) and stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    r = subprocess.run([*LAUNCHER, "server", f"--socket={sock}"], env=_env(sock), capture_output=True, text=True,
                       timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and r.stderr == f"lguest-jit: server: a warm launcher already listens on {sock}\n"
    assert proc.poll() is None


@needs_kvm
def test_a_run_through_the_server_is_the_same_run(server, tmp_path):
    """The tiny rng guest, via the server and without it: same status, same
    device work; only the server's run says it was forked, and its start-up
    (exec of the client -> first KVM_RUN) is counted from the client's exec."""
    _, sock = server
    kernel = tmp_path / "tiny.elf"
    kernel.write_bytes(_elf64(_guest(), LOAD))
    results = {}
    for how, env in (("warm", _env(sock)), ("cold", _env(sock, LGUEST_JIT_SERVER="off"))):
        stats = tmp_path / f"{how}.json"
        t0 = time.time()
        r = subprocess.run([*LAUNCHER, "--rng", f"--stats-json={stats}", "64", str(kernel)], env=env,
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        st = json.loads(stats.read_text())
        results[how] = st
        assert st["queues"]["rng"]["requests"]["bytes"] == REQUEST
        assert 0 < st["seconds_to_first_run"] < time.time() - t0
    assert results["warm"]["warm_launcher"] is True and results["cold"]["warm_launcher"] is False
    assert results["warm"]["exits"]["mmio"] == results["cold"]["exits"]["mmio"]


def test_bad_input_answers_the_same_through_the_server(server, tmp_path):
    _, sock = server
    for env in (_env(sock), _env(sock, LGUEST_JIT_SERVER="off")):
        r = subprocess.run([*LAUNCHER, "64", str(tmp_path / "missing")], env=env, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and r.stderr.startswith("lguest-jit: ") and r.stderr.count("\n") == 1, r.stderr
        assert "missing" in r.stderr


@needs_kvm
def test_a_server_with_other_settings_declines_and_the_client_runs_itself(server, tmp_path):
    """Numba reads NUMBA_* once, at import: a client whose settings differ
    from the server's would get other code, so it runs in-process."""
    _, sock = server
    kernel = tmp_path / "tiny.elf"
    kernel.write_bytes(_elf64(_guest(), LOAD))
    stats = tmp_path / "s.json"
    r = subprocess.run([*LAUNCHER, "-v", "--rng", f"--stats-json={stats}", "64", str(kernel)],
                       env=_env(sock, NUMBA_COLOR_SCHEME="no_color"), stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "declined (this server runs other NUMBA_* settings); starting without it" in r.stderr
    assert json.loads(stats.read_text())["warm_launcher"] is False


@needs_kvm
def test_signals_reach_the_guest_and_a_vanished_client_ends_it(server, tmp_path):
    proc, sock = server
    kernel = tmp_path / "spin.elf"
    kernel.write_bytes(_elf64(bytes(Asm(LOAD).label("l").jmp("l")), LOAD))

    def start():
        c = subprocess.Popen([*LAUNCHER, "64", str(kernel)], env=_env(sock), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not _children(proc.pid):
            assert c.poll() is None and time.monotonic() < deadline, c.stderr.read() if c.poll() else "no child"
            time.sleep(0.05)
        return c, _children(proc.pid)[0]

    # SIGTERM to the client goes to its guest, which dies of it; so does the
    # client, as a launcher run without the server would.
    client, child = start()
    client.send_signal(signal.SIGTERM)
    assert client.wait(timeout=60) == -signal.SIGTERM
    assert not os.path.exists(f"/proc/{child}") or child not in _children(proc.pid)
    # A client killed outright (SIGKILL cannot be relayed) leaves no guest behind.
    client, child = start()
    client.kill()
    client.wait(timeout=10)
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{child}") and child in _children(proc.pid):
        assert time.monotonic() < deadline, "the orphaned guest kept running"
        time.sleep(0.05)


def test_no_server_means_an_ordinary_start(tmp_path, monkeypatch):
    """Nothing listens (or LGUEST_JIT_SERVER=off): the client says so by
    returning None, at the cost of one failed connect."""
    monkeypatch.setenv("LGUEST_JIT_SERVER", str(tmp_path / "nobody.sock"))
    assert warm.run_via_server(["64", "x"]) is None
    monkeypatch.setenv("LGUEST_JIT_SERVER", "off")
    assert warm.socket_path() is None and warm.run_via_server(["64", "x"]) is None


def test_a_stranger_speaking_garbage_does_not_hurt_the_server(server):
    proc, sock = server
    for payload in (b"", b"{not json\n", b"[1, 2]\n", json.dumps({"protocol": 99}).encode() + b"\n", b"x" * 100):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(sock))
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(30)
        reply = s.recv(4096)
        s.close()
        assert b"pid" not in reply
    assert proc.poll() is None


def test_process_start_is_this_process(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import time, lguest_jit.warm as w; print(time.time() - w.process_start())"],
                       capture_output=True, text=True, timeout=60)
    age = float(r.stdout)
    assert 0 <= age < 5


def test_a_well_formed_header_with_bad_fields_is_declined(server):
    """Right identity and descriptors, but fields of the wrong types: the
    server declines before forking (no child ever sees such a request)."""
    proc, sock = server
    base = {"protocol": warm.PROTOCOL, "argv": ["64", "x"], "cwd": "/", "env": {}, "umask": 0o22, "started": 0.0,
            **warm._identity()}
    for bad in ({"env": ["not", "a", "dict"]}, {"cwd": 5}, {"umask": "022"}, {"argv": "64 x"}):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(sock))
        warm._send(s, {**base, **bad}, fds=(0, 1, 2))
        s.settimeout(30)
        reply = json.loads(s.recv(4096))
        s.close()
        assert "malformed" in reply.get("refused", ""), (bad, reply)
    assert proc.poll() is None and _children(proc.pid) == []


def test_the_launcher_and_the_warm_launcher_do_not_import_each_other():
    # warm.py reaches main only through the callable serve() is given.
    import ast
    from pathlib import Path

    import lguest_jit
    src = (Path(lguest_jit.__file__).parent / "warm.py").read_text()
    names = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    assert not {"main", "lguest_jit.main", ".main"} & names, names
