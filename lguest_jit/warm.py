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
Python, module search path, ``NUMBA_*``/``PYTHON*``/``LD_*`` settings, or
in another process context (namespaces, root, credentials, capabilities,
limits, cgroup, CPU affinity: ``_context``), any of which would make the
run differ; a file descriptor 0-2 closed; ``--hypervisor=lguest`` (that
backend's start-up is not Numba's); a server that does not answer within
``CLIENT_DEADLINE_S``.  It then runs in-process, as without a server.

Trust, both ways (README, "Starting fast"):
- the server serves only its own uid (SO_PEERCRED), reads one request of at
  most ``HEADER_MAX`` bytes within ``REQUEST_DEADLINE_S``, nested at most
  ``MAX_DEPTH`` deep, and declines anything malformed before it forks;
- the client talks only to a socket that is its own (owned by its uid, mode
  without group/other bits, in directories only it and root can write:
  ``hw.pathtrust``) and whose listener runs as its uid (SO_PEERCRED); it
  signals only the pid the server names when that is a child of that very
  server running as its uid, checked again before every signal.
A child runs in its own session, so the terminal it is handed is never its
controlling one (no SIGTTOU/SIGTTIN).
"""
from __future__ import annotations

import array
import json
import math
import os
import re
import resource
import selectors
import signal
import socket
import stat
import struct
import sys
import time
from pathlib import Path

PROTOCOL = 2                      # 2: descriptors (with the working directory's) only once the server is ready
HEADER_MAX = 1 << 20              # argv + environment: far more than any real one
REQUEST_DEADLINE_S = 5.0          # a whole request, however it trickles in; then the client is dropped
CLIENT_DEADLINE_S = 10.0          # connect -> the server's first answer; then the client runs by itself
MAX_DEPTH = 4                     # a request nests 2 deep; json would recurse once per bracket
N_FDS = 4                         # stdin, stdout, stderr, working directory
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
    same code the client would: the package sources, the interpreter, its
    module search path and start-up settings, Numba's own settings (read
    once, at its import), and the process context (``_context``)."""
    from . import SOURCE_DIGEST
    startup = {k: v for k, v in os.environ.items() if k.startswith(_STARTUP_ENV)}
    return {"source": SOURCE_DIGEST, "python": [os.path.realpath(sys.executable), sys.version],
            "numba_env": {k: v for k, v in os.environ.items() if k.startswith("NUMBA_")},
            "search_path": {"sys.path": list(sys.path), "flags": list(sys.flags),
                            "xoptions": {str(k): str(v) for k, v in sys._xoptions.items()},
                            "warnoptions": list(sys.warnoptions), "env": startup},
            "context": _context()}


# Read by the interpreter, the dynamic linker or the C library at start-up:
# the server's child would not see the client's values.
_STARTUP_ENV = ("PYTHON", "LD_", "GLIBC_TUNABLES", "MALLOC_")


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _context() -> dict:
    """Everything about the process, besides what the request carries
    (argv, environment, descriptors, working directory, umask), that
    changes what a run can see or do: its namespaces (paths resolve in the
    mount namespace, taps are made in the network one), root, credentials,
    capabilities and seccomp, resource limits, cgroup, CPU affinity, nice
    value and security label.  A value that cannot be read is None (and
    then differs from a server that can read it)."""
    ns = {}
    try:
        for name in sorted(os.listdir("/proc/self/ns")):
            ns[name] = os.readlink(f"/proc/self/ns/{name}")
    except OSError:
        ns = None
    try:
        root = os.stat("/")
        root_id = [root.st_dev, root.st_ino]
    except OSError:
        root_id = None
    status = _read("/proc/self/status")
    privileges = None
    if status is not None:
        keep = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp", "Seccomp_filters")
        privileges = sorted(line for line in status.splitlines() if line.split(":", 1)[0] in keep)
    limits = {name: list(resource.getrlimit(getattr(resource, name)))
              for name in sorted(dir(resource)) if name.startswith("RLIMIT_")}
    return {"namespaces": ns, "root": root_id,
            "credentials": [os.getuid(), os.geteuid(), os.getgid(), os.getegid(), sorted(os.getgroups())],
            "privileges": privileges, "limits": limits, "cgroup": _read("/proc/self/cgroup"),
            "cpus": sorted(os.sched_getaffinity(0)), "nice": os.getpriority(os.PRIO_PROCESS, 0),
            "label": _read("/proc/self/attr/current")}


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
# The wire: one JSON object per line, both ways


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")


def nesting(text: str) -> int:
    """How deep ``text``'s JSON brackets nest, strings skipped; for text
    that is not JSON, at least as deep as ``json.loads`` would recurse
    before it gave up.  Iterative: any input costs one linear scan."""
    depth = deepest = 0
    for m in _BRACKET.finditer(_STRING.sub('""', text)):
        depth += 1 if m.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def parse_message(line: bytes):
    """One message; ValueError for anything but UTF-8 JSON at most
    ``MAX_DEPTH`` deep and ``HEADER_MAX`` long (json would otherwise recurse
    once per bracket: RecursionError, not a refusal)."""
    if len(line) > HEADER_MAX:
        raise ValueError("a message too long")
    text = line.decode("utf-8")                 # UnicodeDecodeError is a ValueError
    if nesting(text) > MAX_DEPTH:
        raise ValueError(f"a message nested more than {MAX_DEPTH} deep")
    return json.loads(text)


def _strings(value) -> bool:
    """A string the child can hand the OS: no NUL, and bytes again
    (surrogates only as os.fsdecode makes them; "\\ud800" is not)."""
    if not isinstance(value, str) or "\0" in value:
        return False
    try:
        os.fsencode(value)
    except UnicodeError:
        return False
    return True


def parse_request(data: bytes) -> dict:
    """A client's request line (the bytes up to its newline) -> the request,
    every field of the type the child relies on; ValueError otherwise."""
    request = parse_message(data.split(b"\n", 1)[0])
    if not isinstance(request, dict):
        raise ValueError("the request is not a JSON object")
    if request.get("protocol") != PROTOCOL:
        raise ValueError("another protocol version")
    argv, env, umask, started = (request.get(k) for k in ("argv", "env", "umask", "started"))
    if not (isinstance(argv, list) and all(_strings(a) for a in argv)):
        raise ValueError("a malformed command line")
    if not (isinstance(env, dict) and all(_strings(k) and k and "=" not in k and _strings(v) for k, v in env.items())):
        raise ValueError("a malformed environment")
    if type(umask) is not int or not 0 <= umask <= 0o777:
        raise ValueError("a malformed umask")
    if type(started) not in (int, float) or not math.isfinite(started) or started < 0:
        raise ValueError("a malformed start time")
    return request


# ---------------------------------------------------------------------------
# Client


def _send(sock: socket.socket, msg: dict, fds=()) -> None:
    data = json.dumps(msg).encode() + b"\n"
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sent = sock.sendmsg([data], anc)
    if sent < len(data):
        sock.sendall(data[sent:])


def _lines(sock: socket.socket, deadline: list):
    """JSON messages from ``sock`` until it closes (socket.timeout past
    ``deadline[0]``, a time.monotonic() value, or never if None: the
    caller may change it between messages)."""
    buf = b""
    while True:
        sock.settimeout(None if deadline[0] is None else max(0.001, deadline[0] - time.monotonic()))
        try:
            chunk = sock.recv(4096)
        except InterruptedError:
            continue
        if not chunk:
            return
        buf += chunk
        if len(buf) > HEADER_MAX:
            raise ValueError("an answer too long")
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield parse_message(line)


def _peer(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a Unix socket: for a
    listener, who called listen() (SO_PEERCRED)."""
    pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                         struct.calcsize("3i")))
    return pid, uid


def _child_of(pid: int, parent: int) -> bool:
    """``pid`` is, right now, a child of ``parent`` running as our uid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            ppid = int(f.read().rsplit(b")", 1)[1].split()[1])       # field 4 of proc(5), after "comm)"
        with open(f"/proc/{pid}/status") as f:
            uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
    except (OSError, ValueError, IndexError, StopIteration):
        return False
    return ppid == parent and all(int(u) == os.getuid() for u in uids)


def _untrusted(path: Path) -> str | None:
    """Why the socket at ``path`` is not the user's own, or None."""
    from .hw.pathtrust import path_problem
    try:
        st = os.lstat(path)
    except OSError:
        return "nothing there"
    if not stat.S_ISSOCK(st.st_mode):
        return "not a socket"
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        return f"the socket is not ours alone (uid {st.st_uid}, mode {st.st_mode & 0o777:o})"
    return path_problem(str(path.parent))


def _request(argv: list[str]) -> dict:
    return {"protocol": PROTOCOL, "argv": argv, "env": dict(os.environ), "umask": _umask(),
            "started": process_start(), **_identity()}


def run_via_server(argv: list[str], verbose: bool = False) -> int | None:
    """Hand this run to a warm launcher: its exit status, or None when
    there is none to use (the caller then runs the guest itself)."""
    path = socket_path()
    if path is None:
        return None

    def declined(why: str) -> None:
        if verbose:
            print(f"lguest-jit: not using the warm launcher at {path}: {why}; starting without it", file=sys.stderr)

    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            return None
    why = _untrusted(path)
    if why is not None:
        if why != "nothing there":
            declined(why)
        return None
    try:
        cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)   # exact, even if renamed or deleted
    except OSError:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        return _converse(sock, path, argv, cwd, declined)
    except KeyboardInterrupt:
        # ^C before the server answered: as the plain run would end (the
        # server ends the child it may have forked when the socket closes).
        sock.close()
        return _die_like(signal.SIGINT)
    finally:
        sock.close()
        os.close(cwd)


def _converse(sock, path, argv, cwd, declined) -> int | None:
    deadline = [time.monotonic() + CLIENT_DEADLINE_S]
    try:
        sock.settimeout(CLIENT_DEADLINE_S)
        sock.connect(str(path))
        server_pid, uid = _peer(sock)
        if uid != os.getuid():
            declined(f"it runs as uid {uid}")
            return None
        _send(sock, _request(argv))
        replies = _lines(sock, deadline)
        first = next(replies, None)
        if isinstance(first, dict) and first.get("ready") is True:
            _send(sock, {}, fds=(0, 1, 2, cwd))       # the descriptors once the server is known to be awake
            first = next(replies, None)
    except (OSError, ValueError) as exc:          # socket.timeout is an OSError
        declined(f"no answer ({exc.strerror or exc})" if isinstance(exc, OSError) else "a garbled answer")
        return None
    if not isinstance(first, dict) or "pid" not in first:
        if isinstance(first, dict) and isinstance(first.get("refused"), str):
            declined(f"declined ({first['refused']})")
        return None
    pid = first["pid"]
    if type(pid) is not int or pid <= 1 or not _child_of(pid, server_pid):
        declined(f"it named pid {pid!r}, which is not its child")
        return None
    deadline[0] = None                    # the run takes as long as it takes
    previous = {}

    def relay(signum, _frame):
        if _child_of(pid, server_pid):           # not once the server has reaped it (the pid may be reused)
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for sig in FORWARDED:
        previous[sig] = signal.signal(sig, relay)
    ended = None
    try:
        ended = next((msg for msg in replies if isinstance(msg, dict) and ("exit" in msg or "signal" in msg)), None)
    except (OSError, ValueError):
        pass
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    status = None if ended is None else ended.get("exit", ended.get("signal"))
    if type(status) is not int or not 0 <= status < 256:
        print(f"lguest-jit: the warm launcher at {path} went away; the guest's status is unknown",
              file=sys.stderr)
        return 1
    if "exit" in ended:
        return status
    return _die_like(status)


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
                    try:
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
                    except Exception as exc:          # noqa: BLE001 - one client's trouble is that client's only
                        self.log(f"a client's request failed: {type(exc).__name__}: {exc}")
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
            if conn is not None:
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
            _pid, uid = _peer(conn)
            if uid != os.getuid():
                self.log(f"refused a client of uid {uid}")
                conn.close()
                return
            deadline = time.monotonic() + REQUEST_DEADLINE_S
            request = parse_request(self._receive(conn, fds, deadline))
            why = refusal(request, self.identity)
            if why is None:
                # Only now the descriptors: a client whose server stops
                # before this point has handed over none (they would sit in
                # the socket's queue, keeping its pipes open, until then).
                _send(conn, {"ready": True})
                self._receive(conn, fds, deadline)
                if len(fds) != N_FDS:
                    why = "no terminal and directory descriptors"
            if why is not None:
                self.log(f"declined a run: {why}")
                _send(conn, {"refused": why})
                conn.close()
                return
            pid = self._fork(conn, request, fds)
        except ValueError as exc:
            self.log(f"declined a request: {exc}")
            try:
                conn.settimeout(0)
                _send(conn, {"refused": str(exc)})
            except OSError:
                pass
            conn.close()
            return
        except OSError as exc:
            self.log(f"dropped a client: {exc}")
            conn.close()
            return
        finally:
            for fd in fds:
                os.close(fd)
        try:
            conn.settimeout(None)
            _send(conn, {"pid": pid})
        except OSError as exc:
            # The client is gone before it knew its child: nobody will relay
            # to it or read its status, so it ends now (and is reaped).
            self.log(f"a client went away before its run started ({exc.strerror or exc}); ending it")
            conn.close()
            self.children[pid] = None
            os.kill(pid, signal.SIGTERM)
            return
        self.children[pid] = conn
        sel.register(conn, selectors.EVENT_READ, pid)

    def _receive(self, conn, fds: list[int], deadline: float) -> bytes:
        """One line from the client (up to its newline), read by
        ``deadline`` however it trickles in; descriptors that come with it
        go into ``fds`` as they arrive (the caller closes them, whatever
        happens here)."""
        data = b""
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ValueError(f"no whole request within {REQUEST_DEADLINE_S:g} s")
            conn.settimeout(left)
            msg, anc, _flags, _ = conn.recvmsg(65536, socket.CMSG_SPACE(N_FDS * 4))
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(payload[:len(payload) - len(payload) % a.itemsize])
                    fds.extend(a)
            if not msg:
                raise ValueError("the client closed before its request")
            data += msg
            if len(data) > HEADER_MAX + 1:
                raise ValueError("request too long")
        return data

    def _fork(self, conn, request, fds) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        # Signals stay blocked until the child has its own handlers: a
        # SIGTERM sent to it at once (its client vanished) is then never
        # taken by the server's handler it inherits, and so never lost.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, (*FORWARDED, signal.SIGCHLD))
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            raise
        if pid == 0:
            status = 1
            try:
                status = self._child(conn, request, fds, blocked)
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
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return pid

    def _child(self, conn, request, fds, sigmask) -> int:
        os.setsid()                       # the handed terminal is never this process's controlling one
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                    signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, sigmask)
        conn.close()
        self.listener.close()
        for c in self.children.values():
            if c is not None:
                c.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        cwd = fds.pop()
        os.fchdir(cwd)                    # the client's own directory, even if renamed or deleted since
        os.close(cwd)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        fds.clear()
        os.umask(request["umask"])
        os.environ.clear()
        os.environ.update(request["env"])            # strings: parse_request checked
        sys.stdin = open(0, "r", closefd=False)
        sys.stdout = open(1, "w", closefd=False, buffering=1 if os.isatty(1) else -1)
        sys.stderr = open(2, "w", closefd=False, buffering=1)
        sys.argv = ["lguest-jit", *request["argv"]]
        return self.run(request["argv"], started=float(request.get("started") or time.time()))

    def _report(self, conn, status) -> None:
        if conn is None:
            return                        # its client went away before the run started
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
            if pid not in self.children:
                continue
            conn = self.children.pop(pid)
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


def refusal(request: dict, identity: dict) -> str | None:
    """Why a server of ``identity`` declines a well-formed request (the
    client then runs by itself), or None: anything that would make the
    forked run differ from the client's own."""
    for key, what in (("source", "other lguest-jit sources"), ("python", "another Python"),
                      ("search_path", "another module search path or Python settings"),
                      ("numba_env", "other NUMBA_* settings")):
        if request.get(key) != identity[key]:
            return f"this server runs {what}"
    theirs = request.get("context")
    if theirs != identity["context"]:
        ours = identity["context"]
        differ = [k for k in ours if not isinstance(theirs, dict) or theirs.get(k) != ours[k]]
        return f"this server runs in another process context ({', '.join(differ) or 'shape'})"
    return None


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
