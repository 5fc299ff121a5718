"""lguest-jit: run a Linux guest with virtio-pci devices, or benchmark the engine.

Usage:
  lguest-jit bench <what> [--json] [--quick] [--plot=FILE]
  lguest-jit [options] [--tunnet=SPEC]... [--block=FILE]... <mem-in-mb> <vmlinux> [<args>...]
  lguest-jit (-h | --help)
  lguest-jit --version

Options:
  -v --verbose          Print devices, status changes, resets and window accesses.
  -t --tunnet=SPEC      Network device on a tap: IP[:MAC] or bridge:NAME[:MAC].
  -b --block=FILE       Block device backed by FILE (FILE,ro for read-only).
  -r --rng              Random number device.
  -i --initrd=FILE      Initial ram disk.
  -u --username=USER    Drop privileges to USER after setup.
  -c --chroot=DIR       Chroot to DIR after setup.
  --hypervisor=KIND     kvm or lguest [default: auto].
  --strict              Stop with "bad driver" on any driver conformance error.
  --stats               Print resource use and per-queue counters at exit.
  --stats-json=FILE     Write the same as JSON to FILE.
  --json                Benchmarks: print JSON instead of a table.
  --quick               Benchmarks: shorter measurements.
  --plot=FILE           Benchmarks: draw the comparison as a PNG.
  -h --help             Show this help.
  --version             Show the version.

Benchmarks: vring, pci, decode, blk, rng, exits, boot, or all.
"""
from __future__ import annotations

# Only the standard library and docopt here: --help, --version and bad
# arguments must answer without loading Numba or numpy (~0.5 s).  Whatever
# pulls them in (benchmarks, devices, hw, pci) is imported inside the
# function that needs it, once the arguments have been checked.
import importlib
import importlib.util
import json
import os
import signal
import sys
import threading
import time

from docopt import DocoptExit, docopt

from . import __version__
from .devices.tunspec import parse_tunnet
from .hw.hosts import LGUEST_DEVICE, lguest_available

BENCHMARKS = ("vring", "pci", "decode", "blk", "rng", "exits", "boot")


class UsageError(Exception):
    """Bad input from the command line: one line, non-zero exit, no traceback."""


def _check_plot_path(path: str) -> None:
    """--plot is checked before the benchmarks run, not after minutes of them."""
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib (pip install 'lguest-jit[plot]')")
    _writable_output(path, "--plot")


def _bench(args) -> int:
    what = args["<what>"]
    names = BENCHMARKS if what == "all" else (what,)
    if what != "all" and what not in BENCHMARKS:
        raise UsageError(f"unknown benchmark {what!r}; choose from {', '.join(BENCHMARKS)} or all")
    if args["--plot"]:
        _check_plot_path(args["--plot"])
    reports = []
    for name in names:
        try:
            mod = importlib.import_module(f"benchmarks.bench_{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"benchmarks.bench_{name}":
                raise
            reports.append({"benchmark": name, "skipped": "not built yet"})
            continue
        reports.append(mod.run(quick=args["--quick"]))
    result = reports[0] if len(reports) == 1 else {"benchmarks": reports}
    if args["--plot"]:
        _plot(reports, args["--plot"])
    if args["--json"]:
        print(json.dumps(result, indent=2))
    else:
        _print_table(reports)
    return 0


def _plot(reports, path: str) -> None:
    from benchmarks.plot import plot
    if not plot(reports, path):
        raise UsageError("--plot: every benchmark was skipped, nothing to draw")


def _print_table(reports) -> None:
    for rep in reports:
        print(f"== {rep['benchmark']}" + (f": skipped ({rep['skipped']})" if "skipped" in rep else ""))
        if "skipped" in rep:
            continue
        cols = [k for k in rep if isinstance(rep[k], dict)]
        metrics = list(dict.fromkeys(m for c in cols for m in rep[c]))
        width = max(16, *(len(c) + 2 for c in cols))
        print("  " + "metric".ljust(36) + "".join(c.rjust(width) for c in cols))
        for m in metrics:
            cells = []
            for c in cols:
                v = rep[c].get(m)
                cells.append(("-" if v is None else f"{v:,.2f}" if isinstance(v, float) else str(v)).rjust(width))
            print("  " + m.ljust(36) + "".join(cells))
        if "python_note" in rep:
            print(f"  note: {rep['python_note']}")


# ---------------------------------------------------------------------------
# Running a guest

MIN_MEM_MB = 16


def _host_available_mb() -> int:
    import psutil
    return psutil.virtual_memory().available // (1 << 20)


def _readable_file(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise UsageError(f"{what} {path!r} does not exist")
    if not os.path.isfile(path):
        raise UsageError(f"{what} {path!r} is not a regular file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{what} {path!r} is not readable")
    return path


def _input_size(path: str, what: str, limit: int, limit_what: str) -> int:
    """The size of input file ``path``, refused (one line) when it is not a
    regular file, is empty, or is larger than ``limit`` bytes: checked with
    stat alone, before the launcher creates or reads anything."""
    st = os.stat(_readable_file(path, what))
    if st.st_size == 0:
        raise UsageError(f"{what} {path!r} is empty")
    if st.st_size > limit:
        raise UsageError(f"{what} {path!r} is too large: {st.st_size} bytes, more than {limit_what} "
                         f"({limit} bytes)")
    return st.st_size


def _writable_output(path: str, what: str) -> str:
    """An output file the launcher writes at the end: checked now so the run's
    result is never lost to a bad path."""
    if not path:
        raise UsageError(f"{what}: empty file name")
    if path.endswith(os.sep) or os.path.isdir(path):
        raise UsageError(f"{what}: {path!r} is a directory, not a file")
    if os.path.lexists(path):
        if not os.path.isfile(path):
            raise UsageError(f"{what}: {path!r} exists and is not a regular file")
        if not os.access(path, os.W_OK):
            raise UsageError(f"{what}: {path!r} is not writable")
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d) or not os.access(d, os.W_OK | os.X_OK):
        raise UsageError(f"{what}: cannot write into {d!r}")
    return path


HYPERVISORS = ("auto", "kvm", "lguest")


def _kvm_problem() -> str | None:
    """None when /dev/kvm is usable, else why not.  The KVM backend (and with
    it Numba) is imported only when there is a /dev/kvm to ask."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    from .hw.kvm import kvm_available
    return kvm_available()


def _choose_hypervisor(kind: str) -> str:
    if kind not in HYPERVISORS:
        raise UsageError(f"--hypervisor must be kvm, lguest or auto, not {kind!r}")
    if kind == "lguest":
        if not lguest_available():
            raise UsageError(f"--hypervisor=lguest: {LGUEST_DEVICE} does not exist on this host")
        return kind
    why = _kvm_problem()
    if why is None:
        return "kvm"
    if kind == "kvm":
        raise UsageError(f"--hypervisor=kvm: {why}")
    if lguest_available():
        return "lguest"
    raise UsageError("no usable /dev/kvm and no /dev/lguest: this host cannot run guests")


class RunConfig:
    """Every argument, validated before anything is created."""

    def __init__(self, args):
        mem = args["<mem-in-mb>"]
        try:
            self.mem_mb = int(mem, 10)
        except ValueError:
            raise UsageError(f"memory size {mem!r} is not a whole number of megabytes") from None
        if self.mem_mb <= 0:
            raise UsageError(f"memory size must be positive, got {self.mem_mb} MB")
        if self.mem_mb < MIN_MEM_MB:
            raise UsageError(f"memory size {self.mem_mb} MB is too small to boot Linux (minimum {MIN_MEM_MB} MB)")
        if self.mem_mb >= 1 << 22:
            raise UsageError(f"memory size {self.mem_mb} MB is absurd (4 TiB or more)")
        avail = _host_available_mb()
        if self.mem_mb > avail:
            raise UsageError(f"memory size {self.mem_mb} MB is more than the host has free ({avail} MB)")
        # The whole kernel file is read into host memory; an initrd must fit in guest RAM.
        self.kernel = args["<vmlinux>"]
        _input_size(self.kernel, "kernel", avail << 20, "the host has free")
        self.initrd = args["--initrd"]
        if self.initrd is not None:
            _input_size(self.initrd, "initrd", self.mem_mb << 20, "guest RAM")
        self.cmdline = " ".join(args["<args>"])
        self.blocks = []
        for spec in args["--block"]:
            path, _, flags = spec.partition(",")
            if flags not in ("", "ro"):
                raise UsageError(f"--block={spec}: unknown flag {flags!r} (only ',ro')")
            self.blocks.append((_readable_file(path, "block device file"), flags == "ro"))
        self.nets = []
        for spec in args["--tunnet"]:
            try:
                self.nets.append(parse_tunnet(spec))
            except ValueError as exc:
                raise UsageError(f"--tunnet={spec}: {exc}") from None
        if self.nets and not os.path.exists("/dev/net/tun"):
            raise UsageError("--tunnet needs /dev/net/tun, which this host lacks")
        self.rng = bool(args["--rng"])
        self.user = None
        if args["--username"]:
            import pwd
            try:
                self.user = pwd.getpwnam(args["--username"])
            except KeyError:
                raise UsageError(f"--username: no user {args['--username']!r}") from None
        self.chroot = args["--chroot"]
        if self.chroot and not os.path.isdir(self.chroot):
            raise UsageError(f"--chroot: {self.chroot!r} is not a directory")
        self.verbose = bool(args["--verbose"])
        self.strict = bool(args["--strict"])
        self.stats = bool(args["--stats"])
        self.stats_json = args["--stats-json"]
        if self.stats_json is not None:
            _writable_output(self.stats_json, "--stats-json")
        # Last, the check that imports Numba (the KVM backend): every
        # cheaper mistake has been reported by now.
        self.hypervisor = _choose_hypervisor(args["--hypervisor"])


def _drop_privileges(cfg: RunConfig) -> None:
    # As lguest: chroot first (needs root), then give up the user.
    if cfg.chroot:
        os.chroot(cfg.chroot)
        os.chdir("/")
    if cfg.user is not None:
        os.setgroups([])
        os.setgid(cfg.user.pw_gid)
        os.setuid(cfg.user.pw_uid)


STATS_TOP_REGISTERS = 12     # --stats prints the most accessed port/BAR0 registers


class Launcher:
    """One guest: memory, kernel, bus, devices, backend.  ``run()`` returns
    the exit status, or None when the guest asked to reboot."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.fatal_message = None
        self.devices = []
        self.backend = None
        self.gm = self.bus = None
        self.started = time.monotonic()

    def log(self, line: str) -> None:
        print(f"lguest-jit: {line}", file=sys.stderr, flush=True)

    def fatal(self, message: str) -> None:
        """A device thread died or a strict-mode driver error: stop the guest."""
        if self.fatal_message is None:
            self.fatal_message = message
        if self.backend is not None:
            self.backend.stop()

    def build(self) -> None:
        from . import pci
        from .devices import Block, Rng
        from .hw import loader
        from .hw.memory import GuestMemory
        cfg = self.cfg
        self.gm = GuestMemory(cfg.mem_mb << 20)
        try:
            self.info = loader.load_linux(self.gm, cfg.kernel, cfg.cmdline, cfg.initrd)
        except loader.LoadError as exc:
            raise UsageError(str(exc)) from None
        except MemoryError:
            # The files were sized at argument time; the host's free memory may have shrunk since.
            raise UsageError(f"kernel {cfg.kernel!r}: not enough host memory to load it") from None
        self.bus = pci.Bus(self.gm, strict=cfg.strict, notify_mode="single" if cfg.hypervisor == "lguest" else "per-queue",
                           fatal=self.fatal, log=self.log if cfg.verbose else None)
        from .devices import Console
        from .devices.net import Net
        makers = [lambda: Console(on_fatal=self.fatal, on_interrupt_exit=self._interrupted)]
        makers += [lambda spec=spec: Net(spec, on_fatal=self.fatal) for spec in cfg.nets]
        makers += [lambda p=path, ro=ro: Block(p, readonly=ro, on_fatal=self.fatal) for path, ro in cfg.blocks]
        if cfg.rng:
            makers.append(lambda: Rng(on_fatal=self.fatal))
        for make in makers:
            try:
                d = make()
            except (OSError, ValueError) as exc:
                # A tap that cannot be made, a bridge that is not there, a
                # disk that cannot be opened: one line, and close() undoes
                # what was built so far.
                raise UsageError(str(exc).splitlines()[0]) from None
            self.devices.append(d)
            self.bus.add_device(d)       # the bus logs slot, BAR0 and irq with --verbose
        from .hw.cmos import CmosRtc
        CmosRtc().register(self.bus)     # the guest's wall clock, without Linux's 2 s wait for UIP
        if cfg.hypervisor == "kvm":
            from .hw.kvm import KVM_IRQ_LINE, KvmVm
            from .hw.uart import Uart8250
            self.backend = KvmVm(self.gm, self.bus)
            # THRE interrupts on IRQ 4: Linux's 8250 driver waits for them
            # before it sends user-space output (polling covers only printk).
            # Output to stdout and the line through KVM_IRQ_LINE, both from
            # the compiled vCPU loop.
            self.uart = Uart8250(out_fd=1, kvm_irq=(self.backend.vm_fd, KVM_IRQ_LINE, 4))
            self.uart.register(self.bus)
            self.backend.claim_reset_port()
            self.backend.setup_boot(self.info)
        else:
            from .hw.lguest import LguestBackend
            # Pages up to the end of the BAR window trap as MMIO (lguest's device_limit).
            self.backend = LguestBackend(self.gm, self.bus, self.info.entry,
                                         mmio_limit=self.bus.mmio_base + pci.BAR0_SIZE * len(self.bus.devices))

    def _interrupted(self) -> None:
        self.fatal("three ^C within one second: stopping the guest")
        self.interrupted = True

    def run(self) -> int | None:
        from .pci import BadDriver
        self.interrupted = False
        try:
            result = self.backend.run()
        except BadDriver as exc:
            self.log(f"bad driver: {exc}" + (f" [{exc.detail}]" if exc.detail else ""))
            return 1
        if self.fatal_message is not None:
            self.log(self.fatal_message)
            return 130 if self.interrupted else 1
        status = result.exit_status
        if status:
            self.log(result.report())
        elif self.cfg.verbose:
            self.log(f"guest ended: {result.reason}: {result.message}")
        return status

    def stats(self) -> dict:
        import psutil
        proc = psutil.Process()
        names = {t.native_id: t.name for t in threading.enumerate()}
        names[threading.main_thread().native_id] = "vcpu0"
        for d in self.devices:
            for name, tid in d.thread_ids.items():
                names[tid] = name
        threads = {}
        for d in self.devices:
            for name, (user, system) in d.thread_times.items():
                threads[name] = {"user_s": user, "system_s": system}
        for t in proc.threads():
            name = names.get(t.id, f"thread-{t.id}")
            prev = threads.get(name, {"user_s": 0.0, "system_s": 0.0})
            threads[name] = {"user_s": prev["user_s"] + t.user_time, "system_s": prev["system_s"] + t.system_time}
        ctx = proc.num_ctx_switches()
        mem = proc.memory_info()
        out = {"elapsed_s": time.monotonic() - self.started, "rss_bytes": mem.rss,
               "context_switches": {"voluntary": ctx.voluntary, "involuntary": ctx.involuntary},
               "threads": threads,
               "queues": {d.name: d.counters() for d in self.devices}}
        if self.backend is not None and hasattr(self.backend, "stats"):
            st = self.backend.stats
            out["exits"] = {"pio": st.pio, "mmio": st.mmio, "total": st.total, "assists": dict(st.assists),
                            "other": st.total - st.pio - st.mmio - sum(st.assists.values())}
        if self.bus is not None and hasattr(self.bus, "access_counts"):
            out["exit_registers"] = dict(self.bus.access_counts())   # every non-zero port / BAR0 register
        return out

    def print_stats(self, stream=sys.stderr) -> None:
        st = self.stats()
        print(f"lguest-jit stats: {st['elapsed_s']:.2f} s, RSS {st['rss_bytes'] >> 20} MiB, context switches "
              f"{st['context_switches']['voluntary']} voluntary / {st['context_switches']['involuntary']} involuntary",
              file=stream)
        for name, t in sorted(st["threads"].items()):
            print(f"  thread {name:28s} user {t['user_s']:8.3f} s  system {t['system_s']:8.3f} s", file=stream)
        for dev, queues in st["queues"].items():
            for q, c in queues.items():
                print(f"  queue  {dev + '/' + q:28s} " + " ".join(f"{k} {v}" for k, v in c.items()), file=stream)
        if "exits" in st:
            print(f"  exits  {st['exits']}", file=stream)
        for name, n in list(st.get("exit_registers", {}).items())[:STATS_TOP_REGISTERS]:
            print(f"  access {name:28s} {n}", file=stream)

    def close(self) -> None:
        if self.bus is not None:
            self.bus.close()
        for d in self.devices:
            if hasattr(d, "close"):
                d.close()
        if self.backend is not None:
            self.backend.close()
        if self.gm is not None:
            self.gm.close()


def _run_guest(args, argv) -> int:
    cfg = RunConfig(args)
    launcher = Launcher(cfg)
    usr1 = signal.signal(signal.SIGUSR1, lambda *_: launcher.print_stats())
    ran = False
    try:
        launcher.build()
        from .devices.console import raw_terminal
        with raw_terminal(0):
            _drop_privileges(cfg)
            ran = True
            status = launcher.run()
    finally:
        signal.signal(signal.SIGUSR1, usr1)
        try:
            if ran and cfg.stats:
                launcher.print_stats()
            if ran and cfg.stats_json:
                with open(cfg.stats_json, "w") as f:
                    json.dump(launcher.stats(), f, indent=2)
        finally:
            launcher.close()
    if status is None:
        # The guest rebooted: start afresh, as lguest re-executes itself.
        os.execv(sys.executable, [sys.executable, "-m", "lguest_jit.main", *argv])
    return status


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = docopt(__doc__, argv=argv, version=f"lguest-jit {__version__}")
    except DocoptExit:
        print("lguest-jit: bad arguments; usage: lguest-jit [options] <mem-in-mb> <vmlinux> [<args>...] "
              "(see --help)", file=sys.stderr)
        return 2
    try:
        if args["bench"]:
            return _bench(args)
        return _run_guest(args, argv)
    except UsageError as exc:
        print(f"lguest-jit: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
