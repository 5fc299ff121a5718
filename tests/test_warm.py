"""The warm launcher (``lguest-jit server``, lguest_jit/warm.py): a client
hands its run to the server, which forks a child that runs exactly what the
client would have; status, output, signals and refusals behave as without
a server.  Tiny KVM guests stand in for Linux."""
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from lguest_jit import warm
from lguest_jit.hw.kvm import kvm_available
from lguest_jit.hw.tinyguest import Asm
from test_cli_run import LOAD, REQUEST, _elf64, _guest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
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


def _catches(pid, sig):
    with open(f"/proc/{pid}/status") as f:
        caught = int(next(line for line in f if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught >> (sig - 1) & 1)


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
    (exec of the client -> first KVM_RUN) is counted from the process the
    user started, not from the fork: the client is a shell held until the
    test says "go" and then exec'ing the launcher (exec keeps the process's
    start time), so a start counted from the fork would come after "go"."""
    _, sock = server
    kernel = tmp_path / "tiny.elf"
    kernel.write_bytes(_elf64(_guest(), LOAD))
    results = {}
    for how, env in (("warm", _env(sock)), ("cold", _env(sock, LGUEST_JIT_SERVER="off"))):
        stats = tmp_path / f"{how}.json"
        argv = " ".join([*LAUNCHER, "--rng", f"--stats-json={stats}", "64", str(kernel)])
        c = subprocess.Popen(["sh", "-c", f"read go; exec {argv} </dev/null"], env=env, cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        go = time.time()
        out, err = c.communicate("go\n", timeout=300)
        assert c.returncode == 0, err
        st = json.loads(stats.read_text())
        results[how] = st
        assert st["queues"]["rng"]["requests"]["bytes"] == REQUEST
        # Counted from the shell's start (before "go"), to the first
        # KVM_RUN (after it); process_start() is floored to a clock tick.
        assert st["started_at"] <= go < st["started_at"] + st["seconds_to_first_run"], (how, st, go)
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
        # Started once the server has its child and the client relays
        # SIGTERM (it catches it: before that, SIGTERM would just kill it).
        while not (_children(proc.pid) and _catches(c.pid, signal.SIGTERM)):
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


def test_process_start_is_this_process():
    """process_start() is when the process was created (a shell held until
    "go", then exec'ing Python, keeps its start), not when Python ran: it
    lies before "go" and before the child's own clock read."""
    code = "import time, lguest_jit.warm as w; print(w.process_start(), time.time())"
    c = subprocess.Popen(["sh", "-c", f"read go; exec {sys.executable} -c '{code}'"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, cwd=ROOT)
    go = time.time()
    out, _ = c.communicate("go\n", timeout=60)
    started, now = map(float, out.split())
    assert started <= go <= now


def _request(**changes):
    """A request as a client in the repo root (python -m) would make."""
    saved = sys.path[0]
    sys.path[0] = ROOT
    try:
        return {**warm._request(["64", "x"]), **changes}
    finally:
        sys.path[0] = saved


def test_a_well_formed_header_with_bad_fields_is_declined(server, tmp_path):
    """Fields of the wrong types: the server declines before forking (no
    child ever sees such a request)."""
    proc, sock = server
    cwd = os.open(tmp_path, os.O_PATH)
    try:
        for bad in ({"env": ["not", "a", "dict"]}, {"env": {"A=B": "x"}}, {"env": {"A": "x\0y"}}, {"umask": "022"},
                    {"umask": 1 << 40}, {"argv": "64 x"}, {"argv": ["6\x004"]}, {"started": "now"}, {"started": None}):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(sock))
            warm._send(s, _request(**bad), fds=(0, 1, 2, cwd))
            s.settimeout(30)
            reply = json.loads(s.recv(4096))
            s.close()
            assert "malformed" in reply.get("refused", ""), (bad, reply)
    finally:
        os.close(cwd)
    assert proc.poll() is None and _children(proc.pid) == []


def test_a_client_of_another_uid_is_refused_before_it_is_read(server):
    """The socket opened to everyone for the test (it is 0600), a process
    of uid 65534 connects and sends a request: the server closes without
    an answer (SO_PEERCRED), where a same-uid garbled request gets one."""
    proc, sock = server
    modes = [(p, stat.S_IMODE(os.stat(p).st_mode)) for p in (sock, sock.parent)]
    os.chmod(sock, 0o666)
    os.chmod(sock.parent, 0o711)
    r, w = os.pipe()
    # The stranger reaches the directory through a descriptor opened now:
    # the directories above it stay closed to it.
    where = os.open(sock.parent, os.O_PATH)
    try:
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(f"/proc/self/fd/{where}/{sock.name}")
                os.write(w, b"connected;")
                try:
                    s.sendall(b'{"protocol": 2}\n')
                    s.settimeout(30)
                    answer = s.recv(4096)
                except (BrokenPipeError, ConnectionResetError):
                    answer = b""                      # closed before we were done sending
                os.write(w, b"answer:" + answer)
            except BaseException as exc:
                os.write(w, repr(exc).encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            got = f.read()
        os.waitpid(pid, 0)
    finally:
        os.close(where)
        for p, mode in modes:
            os.chmod(p, mode)
    assert got == b"connected;answer:", got           # connected, and closed on without a word
    # The same bytes from our own uid are read, and answered.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(sock))
    s.sendall(b'{"protocol": 2}\n')
    s.settimeout(30)
    assert b"refused" in s.recv(4096)
    s.close()
    assert proc.poll() is None


class FakeServer:
    """A listening socket in a private directory, served by a thread of
    this process: ``answers`` are sent once a whole request has arrived
    (None: accept and say nothing; no accept at all with ``accept=False``)."""

    def __init__(self, tmp_path, answers=(), accept=True):
        d = tmp_path / "fake"
        d.mkdir(mode=0o700)
        self.path = d / "s.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(self.path))
        os.chmod(self.path, 0o600)
        self.sock.listen(4)
        self.received = b""
        self.connected = threading.Event()
        self.answers = answers
        if accept:
            self.thread = threading.Thread(target=self._serve, daemon=True)
            self.thread.start()

    def _serve(self):
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return                                        # closed unused: the client never connected
        self.connected.set()
        conn.settimeout(60)
        try:
            while b"\n" not in self.received:
                msg, _anc, _f, _ = conn.recvmsg(65536, socket.CMSG_SPACE(4 * 4))
                if not msg:
                    break
                self.received += msg
            for a in self.answers:
                conn.sendall(json.dumps(a).encode() + b"\n")
            conn.recv(1)                                  # until the client closes
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("pid", [-1, 0, 1, "self", "grandchild", "12", True, 2.5])
def test_the_client_signals_only_a_verified_child_of_the_server(tmp_path, monkeypatch, pid):
    """A server that names a pid that is not its child (every process for
    -1, the client itself, an unrelated process...) is not used: the client
    runs by itself, and so never relays a signal to that pid.  The genuine
    case is the next test."""
    victim = None
    if pid == "self":
        pid = os.getpid()
    elif pid == "grandchild":                     # alive, ours, but not the server's child
        victim = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
        pid = int(victim.stdout.readline())
    fake = FakeServer(tmp_path, answers=[{"pid": pid}, {"exit": 7}])
    monkeypatch.setenv("LGUEST_JIT_SERVER", str(fake.path))
    try:
        assert warm.run_via_server(["64", "x"]) is None
    finally:
        fake.close()
        if victim is not None:
            victim.kill()
            victim.wait()


def test_the_client_accepts_a_child_of_the_server(tmp_path, monkeypatch):
    """The check above can pass: a child of the listening process (this
    test process is the fake server) is accepted and its status returned."""
    child = subprocess.Popen(["sleep", "60"])
    fake = FakeServer(tmp_path, answers=[{"pid": child.pid}, {"exit": 7}])
    monkeypatch.setenv("LGUEST_JIT_SERVER", str(fake.path))
    try:
        assert warm.run_via_server(["64", "x"]) == 7
    finally:
        fake.close()
        child.kill()
        child.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="a listener of another uid needs root")
def test_the_client_refuses_a_server_of_another_uid(tmp_path, monkeypatch, capsys):
    """The socket file is ours (made by root), but the process listening
    on it runs as uid 65534 (SO_PEERCRED names whoever called listen()):
    the client sends it nothing, not even its environment, and runs alone."""
    d = tmp_path / "d"
    d.mkdir(mode=0o700)
    path = d / "s.sock"
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(path))
    os.chmod(path, 0o600)
    r, w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            lsock.listen(1)
            os.write(ready_w, b"x")
            conn, _ = lsock.accept()
            conn.settimeout(30)
            got = b""
            while chunk := conn.recv(65536):
                got += chunk
            os.write(w, str(len(got)).encode())
        finally:
            os._exit(0)
    os.close(w)
    os.read(ready_r, 1)
    lsock.close()
    monkeypatch.setenv("LGUEST_JIT_SERVER", str(path))
    try:
        assert warm.run_via_server(["64", "x"], verbose=True) is None
        with os.fdopen(r, "rb") as f:
            received = int(f.read())
    finally:
        os.waitpid(pid, 0)
    assert received == 0
    assert "it runs as uid 65534" in capsys.readouterr().err


@pytest.mark.parametrize("how,words", [("socket owner", "not ours alone"), ("socket mode", "not ours alone"),
                                       ("dir mode", "writable by others"), ("dir owner", "owned by uid 65534")])
def test_the_client_uses_only_a_socket_that_is_its_own(tmp_path, monkeypatch, capsys, how, words):
    fake = FakeServer(tmp_path, answers=[{"pid": os.getpid()}, {"exit": 7}])
    monkeypatch.setenv("LGUEST_JIT_SERVER", str(fake.path))
    if how == "socket owner":
        os.chown(fake.path, 65534, 65534)
    elif how == "socket mode":
        os.chmod(fake.path, 0o666)
    elif how == "dir mode":
        os.chmod(fake.path.parent, 0o777)
    else:
        os.chown(fake.path.parent, 65534, 65534)
    try:
        assert warm.run_via_server(["64", "x"], verbose=True) is None
        assert words in capsys.readouterr().err
        assert not fake.connected.is_set() and fake.received == b""
    finally:
        fake.close()


def test_a_server_that_does_not_answer_leaves_the_client_to_run_alone(tmp_path):
    """A server stopped (SIGSTOP) or wedged: the connection is queued but
    never served.  After CLIENT_DEADLINE_S the client runs by itself (here
    it refuses a missing kernel, as a plain run does)."""
    fake = FakeServer(tmp_path, accept=False)
    try:
        r = subprocess.run([*LAUNCHER, "64", str(tmp_path / "missing")], env=_env(fake.path), cwd=ROOT,
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    finally:
        fake.close()
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "missing' does not exist" in r.stderr, r.stderr


def test_ctrl_c_while_waiting_for_the_server_is_not_a_traceback(tmp_path):
    fake = FakeServer(tmp_path)                       # reads the request, never answers
    try:
        c = subprocess.Popen([*LAUNCHER, "64", str(tmp_path / "missing")], env=_env(fake.path), cwd=ROOT,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while b"\n" not in fake.received:           # the client has sent its request and waits
            assert time.monotonic() < deadline and c.poll() is None, c.stderr.read() if c.poll() is not None else ""
            time.sleep(0.02)
        c.send_signal(signal.SIGINT)
        _, err = c.communicate(timeout=60)
    finally:
        fake.close()
    assert c.returncode == -signal.SIGINT and "Traceback" not in err, (c.returncode, err)


def test_deep_long_and_trickling_requests_do_not_hold_or_hurt_the_server(server):
    proc, sock = server
    # Nested 200,000 deep: refused before json (which would recurse once per bracket) sees it.
    with pytest.raises(ValueError, match="nested more than 4 deep"):
        warm.parse_request(b"[" * 200_000 + b"\n")
    for payload, answer in ((b"[" * 200_000 + b"\n", b"nested more than"), (b'{"a":' * 100_000 + b"\n", b"nested more than"),
                            (b"[" * (2 << 20), b"")):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(sock))
        try:
            s.sendall(payload)
        except OSError:
            pass                                      # dropped while sending: too long
        s.settimeout(60)
        try:
            reply = s.recv(4096)
        except ConnectionResetError:
            reply = b""
        s.close()
        assert answer in reply and b"pid" not in reply, reply
        assert proc.poll() is None
    # A byte every 0.2 s: each recv gets something, the request never ends;
    # the whole-request deadline drops the client all the same.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(sock))
    s.setblocking(False)
    closed = False
    for _ in range(int(warm.REQUEST_DEADLINE_S * 5 * 4)):
        try:
            s.send(b" ")
            if s.recv(4096) is not None:
                closed = True
                break
        except BlockingIOError:
            pass
        except OSError:
            closed = True
            break
        time.sleep(0.2)
    s.close()
    assert closed, "a trickling client held the server"
    assert proc.poll() is None


@needs_kvm
def test_a_client_that_vanishes_ends_only_its_own_run(server, tmp_path):
    """A client that closes right after its request (before it learns its
    child's pid): the server lives on, another client's guest keeps running,
    and the vanished client's child is ended and reaped, not orphaned."""
    proc, sock = server
    kernel = tmp_path / "spin.elf"
    kernel.write_bytes(_elf64(bytes(Asm(LOAD).label("l").jmp("l")), LOAD))
    other = subprocess.Popen([*LAUNCHER, "64", str(kernel)], env=_env(sock), cwd=ROOT, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (_children(proc.pid) and _catches(other.pid, signal.SIGTERM)):
            assert other.poll() is None and time.monotonic() < deadline, other.stderr.read()
            time.sleep(0.05)
        (guest,) = _children(proc.pid)
        # The vanishing client: python -m's sys.path, as the server's.
        code = ("import os, socket, sys; sys.path[0] = os.getcwd(); from lguest_jit import warm; "
                "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); warm._send(s, warm._request(sys.argv[2:])); "
                "assert b'ready' in s.recv(4096); warm._send(s, {}, fds=(0, 1, 2, os.open('.', os.O_PATH))); s.close()")
        subprocess.run([sys.executable, "-c", code, str(sock), "64", str(kernel)], env=_env(sock), cwd=ROOT,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True, timeout=60)
        # Its child (if it was forked) is ended and reaped: the server is
        # left with the other guest alone.
        deadline = time.monotonic() + 60
        while _children(proc.pid) != [guest]:
            assert proc.poll() is None and time.monotonic() < deadline, _children(proc.pid)
            time.sleep(0.05)
        assert proc.poll() is None and other.poll() is None
    finally:
        other.send_signal(signal.SIGTERM)
        other.wait(timeout=60)
    assert other.returncode == -signal.SIGTERM


def test_a_different_module_path_is_declined(server, tmp_path):
    """A PYTHONPATH that shadows a module the run imports (psutil): the
    plain run fails on it, so must the warm one (the server declines)."""
    _, sock = server
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "psutil.py").write_text("raise ImportError('shadowed psutil')\n")
    kernel = tmp_path / "k"
    kernel.write_bytes(b"x")
    pythonpath = os.pathsep.join([str(shadow), *filter(None, [os.environ.get("PYTHONPATH")])])
    runs = {}
    for how, env in (("warm", _env(sock, PYTHONPATH=pythonpath)),
                     ("cold", _env(sock, PYTHONPATH=pythonpath, LGUEST_JIT_SERVER="off"))):
        runs[how] = subprocess.run([*LAUNCHER, "-v", "64", str(kernel)], env=env, cwd=ROOT, stdin=subprocess.DEVNULL,
                                   capture_output=True, text=True, timeout=120)
    assert runs["cold"].returncode != 0 and "shadowed psutil" in runs["cold"].stderr
    assert runs["warm"].returncode == runs["cold"].returncode and "shadowed psutil" in runs["warm"].stderr
    assert "declined (this server runs another module search path or Python settings)" in runs["warm"].stderr


@pytest.mark.skipif(not shutil.which("unshare") or os.geteuid() != 0, reason="unshare -m needs root")
def test_another_mount_namespace_is_declined(server, tmp_path):
    """Paths resolve in the client's mount namespace: a client in another
    one (unshare -m) is declined and runs by itself."""
    _, sock = server
    r = subprocess.run(["unshare", "-m", *LAUNCHER, "-v", "64", str(tmp_path / "missing")], env=_env(sock), cwd=ROOT,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "declined (this server runs in another process context (namespaces" in r.stderr, r.stderr
    assert "missing' does not exist" in r.stderr


def test_a_deleted_working_directory_runs_as_without_the_server(server, tmp_path):
    """The plain run works in a deleted directory (a relative kernel path
    is then simply missing); so does the warm one, without a traceback."""
    _, sock = server
    gone = tmp_path / "gone"
    runs = {}
    for how, env in (("warm", _env(sock)), ("cold", _env(sock, LGUEST_JIT_SERVER="off"))):
        gone.mkdir()
        runs[how] = subprocess.run(["sh", "-c", f"cd {gone} && rmdir {gone} && exec {' '.join(LAUNCHER)} 64 vmlinux"],
                                   env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    for r in runs.values():
        assert r.returncode == 2 and r.stderr == "lguest-jit: kernel 'vmlinux' does not exist\n", r.stderr


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
