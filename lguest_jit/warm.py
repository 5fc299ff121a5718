"""The warm launcher: ``lguest-jit server`` keeps a process with NumPy,
Numba and every cached kernel already loaded, and forks it for each run.

Why: on our hosts ``python -c pass`` takes 0.1 s and ``import numba``
another 0.35-0.45 s, so a launcher that imports Numba cannot reach its
first KVM_RUN in 0.5 s however little work it does itself.  Benchmark runs
and tuning experiments start a guest dozens of times; with a server running,
each ``lguest-jit ...`` (and ``lguest-jit restore``) is a small client that
hands its command line, working directory, environment and terminal (file
descriptors 0-2) to the server, which forks a child that runs exactly what
the client would have run.  The client relays signals to the child and exits
with its status, so scripts cannot tell the difference except by the time.

When the client does not use the server (nothing listens, or it refuses):
``LGUEST_JIT_SERVER=off``; a server started from other sources, another
Python or other ``NUMBA_*`` settings (it would run different code); a file
descriptor 0-2 closed; ``--hypervisor=lguest`` (that backend's start-up is
not Numba's).  It then runs in-process, as without a server.

Safety: the socket is the user's alone (mode 0600) and the server serves
only its own user (SO_PEERCRED); a child runs in its own session, so the
terminal it is handed is never its controlling one (no SIGTTOU/SIGTTIN).
"""
from __future__ import annotations

import array
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time
from pathlib import Path

PROTOCOL = 1
HEADER_MAX = 1 << 20              # argv + environment: far more than any real one
ACCEPT_TIMEOUT_S = 5.0            # a client that connects and says nothing is dropped
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


class ServerError(Exception):
    """The server cannot start (one line for the user)."""


def socket_path() -> Path | None:
    """Where the server listens: $LGUEST_JIT_SERVER, else
    $XDG_RUNTIME_DIR/lguest-jit.sock, else <cache>/server.sock.  None when
    LGUEST_JIT_SERVER is "off"."""
    env = os.environ.get("LGUEST_JIT_SERVER", "")
    if env.lower() in ("off", "0", "no"):
        return None
    if env:
        return Path(env)
    run = os.environ.get("XDG_RUNTIME_DIR")
    if run and os.path.isdir(run):
        return Path(run) / "lguest-jit.sock"
    return Path(os.environ.get("LGUEST_JIT_CACHE", Path.home() / ".cache" / "lguest-jit")) / "server.sock"


def _identity() -> dict:
    """What must match between client and server for the child to run the
    same code the client would: the package sources, the interpreter and
    Numba's own settings (read once, at its import)."""
    from . import SOURCE_DIGEST
    return {"source": SOURCE_DIGEST, "python": [os.path.realpath(sys.executable), sys.version],
            "numba_env": {k: v for k, v in os.environ.items() if k.startswith("NUMBA_")}}


def process_start() -> float:
    """When this process started, seconds since the epoch, to the clock
    tick (10 ms).  Its age comes from CLOCK_BOOTTIME, which counts from the
    same origin as /proc's start time: /proc/stat's btime (what psutil uses)
    is whole seconds, so it can be a second off."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")     # field 22 of proc(5), after "comm)"
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - started
        return time.time() - max(0.0, age)
    except (OSError, ValueError, IndexError):
        return time.time()


# ---------------------------------------------------------------------------
# Client


def _send(sock: socket.socket, msg: dict, fds=()) -> None:
    data = json.dumps(msg).encode() + b"\n"
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sent = sock.sendmsg([data], anc)
    if sent < len(data):
        sock.sendall(data[sent:])


def _lines(sock: socket.socket):
    """JSON messages from ``sock`` until it closes."""
    buf = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except InterruptedError:
            continue
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield json.loads(line)


def run_via_server(argv: list[str], verbose: bool = False) -> int | None:
    """Hand this run to a warm launcher: its exit status, or None when
    there is none to use (the caller then runs the guest itself)."""
    path = socket_path()
    if path is None:
        return None
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None                       # nothing listens: the ordinary start
    with sock:
        request = {"protocol": PROTOCOL, "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ),
                   "umask": _umask(), "started": process_start(), **_identity()}
        try:
            _send(sock, request, fds=(0, 1, 2))
            replies = _lines(sock)
            first = next(replies, None)
        except (OSError, ValueError):
            return None
        if first is None or "pid" not in first:
            if verbose and first is not None:
                print(f"lguest-jit: the warm launcher at {path} declined ({first.get('refused')}); "
                      "starting without it", file=sys.stderr)
            return None
        pid = int(first["pid"])
        previous = {}

        def relay(signum, _frame):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

        for sig in FORWARDED:
            previous[sig] = signal.signal(sig, relay)
        ended = None
        try:
            ended = next((msg for msg in replies if "exit" in msg or "signal" in msg), None)
        except (OSError, ValueError):
            pass
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
    if ended is None:
        print(f"lguest-jit: the warm launcher at {path} went away; the guest's status is unknown",
              file=sys.stderr)
        return 1
    if "exit" in ended:
        return int(ended["exit"])
    return _die_like(int(ended["signal"]))


# The child died of one of these: the client dies of it too, so a caller
# sees what it would have seen without the server.  (Not of a crash signal:
# that would look like, and dump core as, a crash of the client.)
_MIRRORED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGKILL, signal.SIGPIPE, signal.SIGALRM,
             signal.SIGUSR1, signal.SIGUSR2)


def _die_like(signum: int) -> int:
    if signum in _MIRRORED:
        sys.stdout.flush()
        sys.stderr.flush()
        if signum != signal.SIGKILL:
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        time.sleep(1)                     # delivery is immediate; this is not reached
    return 128 + signum                   # as a shell reports it


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


# ---------------------------------------------------------------------------
# Server


def warm_up() -> int:
    """Import every module a run uses and load every kernel of this
    package that the disk cache holds (what earlier runs compiled), plus
    Numba's full target, so a child never waits for any of it.  Returns how
    many kernels were loaded."""
    import importlib
    import pkgutil

    import numba
    from numba.core.registry import cpu_target

    import lguest_jit
    for mod in pkgutil.walk_packages(lguest_jit.__path__, "lguest_jit."):
        if mod.name != "lguest_jit.testing":
            importlib.import_module(mod.name)
    cpu_target.target_context.refresh()
    import numpy as np
    numba.typeof(np.zeros(1))             # Python-side typeof imports numpy.ma (0.1 s) the first time
    magic = cpu_target.target_context.codegen().magic_tuple()     # this machine, in the cache's index keys
    loaded = 0
    seen = set()
    for name, mod in list(sys.modules.items()):
        if not name.startswith("lguest_jit"):
            continue
        for obj in list(vars(mod).values()):
            if not isinstance(obj, numba.core.dispatcher.Dispatcher) or id(obj) in seen:
                continue
            seen.add(id(obj))
            loaded += _load_cached(obj, magic)
    return loaded


def _load_cached(dispatcher, magic) -> int:
    """Load every overload of ``dispatcher`` that its disk cache holds for
    this machine (``magic``).  Best effort: Numba's cache index is not
    public API, and a kernel not loaded here is loaded by the child when
    first called."""
    try:
        index = dispatcher._cache._cache_file._load_index()
        n = 0
        for key in index:
            sig, key_magic = key[0], key[1]
            if key_magic == magic and tuple(sig) not in dispatcher.overloads:
                dispatcher.compile(tuple(sig))
                n += 1
        return n
    except Exception:                     # noqa: BLE001 - see the docstring
        return 0


class Server:
    """One listening socket, one forked child per request, single-threaded
    (fork in a threaded process could copy a lock held by another thread)."""

    def __init__(self, path: Path, run, log=None):
        self.path = path
        self.run = run                  # the launcher's entry: run(argv, started=client's start time)
        self.log = log or (lambda msg: print(f"lguest-jit server: {msg}", file=sys.stderr, flush=True))
        self.identity = _identity()
        self.children: dict[int, socket.socket] = {}
        self.listener: socket.socket | None = None
        self._wake_r = self._wake_w = -1
        self._stopping = False

    def check(self) -> None:
        """Refuse early (before the warm-up) when another server listens."""
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except FileNotFoundError:
            pass
        except OSError:
            if path.is_socket():
                path.unlink()             # left by a server that died
            elif path.exists():
                raise ServerError(f"{path} exists and is not a socket") from None
        else:
            raise ServerError(f"a warm launcher already listens on {path}")
        finally:
            probe.close()

    def bind(self) -> None:
        self.check()
        path = self.path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)             # the socket is born 0600: no window for another user
        try:
            sock.bind(str(path))
        except OSError as exc:
            sock.close()
            raise ServerError(f"cannot listen on {path}: {exc.strerror}") from None
        finally:
            os.umask(old)
        sock.listen(16)
        self.listener = sock

    def serve(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w)
        handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM,
                                                                           signal.SIGCHLD)}
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ, "accept")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stopping:
                for key, _ in sel.select():
                    if key.data == "accept":
                        self._accept(sel)
                    elif key.data == "wake":
                        try:
                            while os.read(self._wake_r, 512):
                                pass
                        except BlockingIOError:
                            pass
                        self._reap(sel)
                    else:
                        self._client_readable(sel, key.fileobj, key.data)
        finally:
            for sig, old in handlers.items():
                signal.signal(sig, old)
            signal.set_wakeup_fd(-1)
            sel.close()                   # the caller closes the server (serve() below)

    def _on_signal(self, signum, _frame):
        if signum != signal.SIGCHLD:
            self._stopping = True

    def close(self) -> None:
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)      # their clients are still waiting: end them like ^C would
            except ProcessLookupError:
                pass
        for pid, conn in list(self.children.items()):
            try:
                _, status = os.waitpid(pid, 0)
                self._report(conn, status)
            except ChildProcessError:
                pass
            conn.close()
        self.children.clear()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    # -- one request -------------------------------------------------------------
    def _accept(self, sel) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        fds: list[int] = []
        try:
            uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                      struct.calcsize("3i")))[1]
            if uid != os.getuid():
                self.log(f"refused a client of uid {uid}")
                conn.close()
                return
            conn.settimeout(ACCEPT_TIMEOUT_S)
            request = self._read_request(conn, fds)
            why = self._refusal(request, fds)
            if why is not None:
                self.log(f"declined a run: {why}")
                _send(conn, {"refused": why})
                conn.close()
                return
            pid = self._fork(conn, request, fds)
        except (OSError, ValueError) as exc:
            self.log(f"dropped a client: {exc}")
            conn.close()
            return
        finally:
            for fd in fds:
                os.close(fd)
        conn.settimeout(None)
        self.children[pid] = conn
        sel.register(conn, selectors.EVENT_READ, pid)
        _send(conn, {"pid": pid})

    def _read_request(self, conn, fds: list[int]) -> dict:
        """The client's request; the descriptors it passed go into ``fds``
        as they arrive (the caller closes them, whatever happens here)."""
        data = b""
        while b"\n" not in data:
            msg, anc, _flags, _ = conn.recvmsg(65536, socket.CMSG_SPACE(3 * 4))
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(payload[:len(payload) - len(payload) % a.itemsize])
                    fds.extend(a)
            if not msg:
                raise ValueError("the client closed before its request")
            data += msg
            if len(data) > HEADER_MAX:
                raise ValueError("request too long")
        request = json.loads(data.split(b"\n", 1)[0])
        if not isinstance(request, dict):
            raise ValueError("the request is not a JSON object")
        return request

    def _refusal(self, request: dict, fds: list[int]) -> str | None:
        if request.get("protocol") != PROTOCOL:
            return "another protocol version"
        if len(fds) != 3:
            return "no terminal descriptors"
        for key, what in (("source", "other lguest-jit sources"), ("python", "another Python"),
                          ("numba_env", "other NUMBA_* settings")):
            if request.get(key) != self.identity[key]:
                return f"this server runs {what}"
        if not isinstance(request.get("argv"), list) or not all(isinstance(a, str) for a in request["argv"]):
            return "a malformed command line"
        env = request.get("env")
        if not (isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
                and isinstance(request.get("cwd"), str) and isinstance(request.get("umask"), int)
                and isinstance(request.get("started", 0.0), (int, float))):
            return "a malformed request"
        return None

    def _fork(self, conn, request, fds) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                status = self._child(conn, request, fds)
            except SystemExit as exc:
                status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:         # noqa: BLE001 - the child must never return into the server
                import traceback
                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(status & 0xFF)
        return pid

    def _child(self, conn, request, fds) -> int:
        os.setsid()                       # the handed terminal is never this process's controlling one
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                    signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        conn.close()
        self.listener.close()
        for c in self.children.values():
            c.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        fds.clear()
        os.chdir(request["cwd"])
        os.umask(int(request["umask"]))
        os.environ.clear()
        os.environ.update(request["env"])            # strings: _refusal checked
        sys.stdin = open(0, "r", closefd=False)
        sys.stdout = open(1, "w", closefd=False, buffering=1 if os.isatty(1) else -1)
        sys.stderr = open(2, "w", closefd=False, buffering=1)
        sys.argv = ["lguest-jit", *request["argv"]]
        return self.run(request["argv"], started=float(request.get("started") or time.time()))

    def _report(self, conn, status) -> None:
        msg = {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {"exit": os.waitstatus_to_exitcode(status)}
        try:
            _send(conn, msg)
        except OSError:
            pass                          # the client is gone

    def _reap(self, sel) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is not None:
                try:
                    sel.unregister(conn)
                except (KeyError, ValueError):
                    pass                  # its client went away before it ended
                self._report(conn, status)
                conn.close()

    def _client_readable(self, sel, conn, pid) -> None:
        # A client says nothing after its request: readable means it is gone
        # (killed, terminal closed).  Its guest ends as if it got SIGTERM.
        try:
            data = conn.recv(64)
        except OSError:
            data = b""
        if not data:
            sel.unregister(conn)
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def serve(run, path: Path | None = None) -> int:
    """``lguest-jit server``: warm up, listen, serve until SIGINT/SIGTERM;
    each request's child calls ``run(argv, started=...)`` (the launcher's
    ``main``, passed in: the launcher imports this module, not the reverse)."""
    path = path if path is not None else socket_path()
    if path is None:
        raise ServerError("LGUEST_JIT_SERVER=off: no socket to listen on")
    t0 = time.monotonic()
    server = Server(path, run)
    server.check()
    try:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")     # fewer threads copied into nothing at fork
        from . import keep_scipy_out
        keep_scipy_out()
        n = warm_up()
        server.bind()                     # only now: a client never waits for the warm-up
        server.log(f"ready on {path} ({n} kernels loaded in {time.monotonic() - t0:.1f} s)")
        server.serve()
    finally:
        server.close()
    return 0
