"""lguest-jit: run a Linux guest with virtio-pci devices, or benchmark the engine.

Usage:
  lguest-jit bench sweep --param=SPEC <what> [--json] [--quick] [--plot=FILE]
  lguest-jit bench <what> [--json] [--quick] [--plot=FILE]
  lguest-jit restore [options] [--tunnet=SPEC]... <dir>
  lguest-jit server [--socket=PATH]
  lguest-jit [options] [--tunnet=SPEC]... [--block=FILE]... <mem-in-mb> <vmlinux> [<args>...]
  lguest-jit (-h | --help)
  lguest-jit --version

Options:
  -v --verbose          Print devices, status changes, resets and window accesses.
  -t --tunnet=SPEC      Network device on a tap: IP[:MAC] or bridge:NAME[:MAC].
  -b --block=FILE       Block device backed by FILE (FILE,ro for read-only).
  -r --rng              Random number device.
  -i --initrd=FILE      Initial ram disk.
  --cpus=N              Virtual CPUs (default 1); more than one needs KVM and
                        a guest kernel with SMP support.
  -u --username=USER    Drop privileges to USER after setup.
  -c --chroot=DIR       Chroot to DIR after setup.
  --hypervisor=KIND     kvm or lguest [default: auto].
  --strict              Stop with "bad driver" on any driver conformance error.
  --stats               Print resource use and per-queue counters at exit.
  --stats-json=FILE     Write the same as JSON to FILE.
  --profile=FILE        Sample the guest's RIP (KVM): folded stacks to FILE, top functions at exit.
  --profile-hz=N        Samples per second for --profile (default 1000, where the host's clock allows).
  --snapshot=DIR        Write a snapshot of the running guest to DIR on SIGUSR2
                        or at the first console line matching --snapshot-on.
  --snapshot-on=REGEX   Take the snapshot when the guest's console prints a
                        line matching REGEX (the first match only).
  --snapshot-exit       Exit (status 0) once the snapshot is written.
  --force               --snapshot: replace an existing DIR; restore: run even
                        though a disk changed since the snapshot.
  --queue-size=N        Queue size every device offers, a power of two from 4
                        to 32768 (default: each device's own: console 128,
                        block 128, net 256, rng 64).
  --blk-poll-us=US      Block: busy-poll this long for the next request before
                        sleeping, 0 never (default: 50).
  --event-idx=ON|OFF    Offer VIRTIO_RING_F_EVENT_IDX, on or off (default: on).
  --indirect=ON|OFF     Offer indirect descriptors, on or off (default: on).
  --seg-max=N           Block: data segments per request offered as seg_max
                        (default: the block queue size - 2).
  --param=SPEC          bench sweep: KNOB=V1,V2,... (a knob above, without --).
  --socket=PATH         server: where to listen (default: $LGUEST_JIT_SERVER,
                        else $XDG_RUNTIME_DIR/lguest-jit.sock, else
                        ~/.cache/lguest-jit/server.sock).
  --json                Benchmarks: print JSON instead of a table.
  --quick               Benchmarks: shorter measurements.
  --plot=FILE           Benchmarks: draw the comparison as a PNG.
  -h --help             Show this help.
  --version             Show the version.

Benchmarks: vring, pci, decode, blk, rng, net, exits, boot, restore, or all.
bench sweep runs one device benchmark (blk, rng, net) per value of a knob.

server keeps a warm launcher (Numba and every cached kernel loaded): while
it runs, each guest run or restore of the same user is forked from it and
reaches its first KVM_RUN in a fraction of the time.  LGUEST_JIT_SERVER=off
runs without it.

restore DIR resumes the guest of a snapshot where it was: same memory,
devices and disks (refused if a disk changed, unless --force); a new tap
for each network device (--tunnet replaces the snapshot's specs).
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
from .devices.knobs import KNOBS, parse_knobs
from .devices.tunspec import parse_tunnet
from .hw.hosts import LGUEST_DEVICE, default_sample_hz, kvm_max_vcpus, lguest_available, max_sample_hz, usable_cpus

BENCHMARKS = ("vring", "pci", "decode", "blk", "rng", "net", "exits", "boot", "restore", "smp")


# Set in a child of the warm launcher (warm.py): when its client started,
# seconds since the epoch.  The start-up figure in --stats counts from there.
PROCESS_START: float | None = None


class UsageError(Exception):
    """Bad input from the command line: one line, non-zero exit, no traceback."""


def _check_plot_path(path: str) -> None:
    """--plot is checked before the benchmarks run, not after minutes of them."""
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib (pip install 'lguest-jit[plot]')")
    _writable_output(path, "--plot")


def _sweep(args) -> int:
    """bench sweep: every argument checked before the first run."""
    from .devices.knobs import parse_sweep
    what = args["<what>"]
    try:
        param, values = parse_sweep(args["--param"])
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    from benchmarks import sweep         # standard library only, like the knobs
    if what not in sweep.SWEEPABLE:
        raise UsageError(f"bench sweep: {what!r} has no device knobs; choose from {', '.join(sweep.SWEEPABLE)}")
    if args["--plot"]:
        _check_plot_path(args["--plot"])
    rep = sweep.run(param, values, what, quick=args["--quick"])
    if args["--plot"] and "skipped" not in rep:
        from benchmarks.plot import plot_sweep
        plot_sweep(rep, args["--plot"])
    if args["--json"]:
        print(json.dumps(rep, indent=2))
    else:
        _print_table([rep])
    return 0


def _bench(args) -> int:
    if args["sweep"]:
        return _sweep(args)
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


def _tunnets(specs) -> list:
    """Every --tunnet spec parsed, and the host able to make taps."""
    nets = []
    for spec in specs:
        try:
            nets.append(parse_tunnet(spec))
        except ValueError as exc:
            raise UsageError(f"--tunnet={spec}: {exc}") from None
    if nets and not os.path.exists("/dev/net/tun"):
        raise UsageError("--tunnet needs /dev/net/tun, which this host lacks")
    return nets


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
        self.nets = _tunnets(args["--tunnet"])
        self.rng = bool(args["--rng"])
        try:
            self.knobs = parse_knobs({name: args[f"--{name}"] for name in KNOBS})
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        self.cpus = _cpus_arg(args["--cpus"])
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
        self.profile, self.profile_hz = _profile_args(args["--profile"], args["--profile-hz"])
        self.snapshot, self.snapshot_on, self.snapshot_exit = _snapshot_options(args)
        self.restore = None
        self.net_specs = list(args["--tunnet"])
        # Last, the check that imports Numba (the KVM backend): every
        # cheaper mistake has been reported by now.
        self.hypervisor = _choose_hypervisor(args["--hypervisor"])
        if self.cpus > 1 and self.hypervisor != "kvm":
            raise UsageError(f"--cpus={self.cpus}: the lguest backend runs one vCPU; more need KVM")
        if self.profile is not None and self.hypervisor != "kvm":
            raise UsageError("--profile samples a KVM vCPU; the lguest backend has no registers to sample")
        if self.snapshot and self.hypervisor != "kvm":
            raise UsageError("--snapshot needs the KVM backend: the lguest backend has no snapshots")


def _cpus_arg(value: str | None) -> int:
    """--cpus=N: 1 to what both KVM (KVM_CAP_MAX_VCPUS) and the MP table
    (8-bit APIC ids) allow.  More vCPUs than host CPUs is allowed (they
    take turns), and said once."""
    if value is None:
        return 1
    from .hw.firmware import MAX_CPUS       # standard library only
    try:
        n = int(value, 10)
    except ValueError:
        raise UsageError(f"--cpus={value}: not a whole number of vCPUs") from None
    if n < 1:
        raise UsageError(f"--cpus={n}: a guest needs at least one vCPU")
    top = kvm_max_vcpus()
    if top is not None and n > top:
        raise UsageError(f"--cpus={n}: this host's KVM allows at most {top} vCPUs per guest (KVM_CAP_MAX_VCPUS)")
    if n > MAX_CPUS:
        raise UsageError(f"--cpus={n}: the MP table the guest reads describes at most {MAX_CPUS} CPUs "
                         f"(8-bit local APIC ids)")
    host = usable_cpus()
    if n > host:
        print(f"lguest-jit: --cpus={n}: more vCPUs than the {host} host CPUs this launcher may use; "
              f"they will take turns", file=sys.stderr, flush=True)
    return n


def _profile_args(path: str | None, hz: str | None):
    """(folded-stacks path or None, samples per second)."""
    if hz is not None and path is None:
        raise UsageError("--profile-hz needs --profile=FILE")
    if path is None:
        return None, 0
    _writable_output(path, "--profile")
    if hz is None:
        return path, default_sample_hz()
    top = max_sample_hz()
    try:
        rate = int(hz, 10)
    except ValueError:
        raise UsageError(f"--profile-hz={hz}: not a whole number of samples per second") from None
    if not 1 <= rate <= top:
        raise UsageError(f"--profile-hz={rate}: must be between 1 and {top} samples per second on this host")
    return path, rate


def _snapshot_options(args):
    """--snapshot=DIR, --snapshot-on=REGEX, --snapshot-exit, checked now."""
    where, on, leave = args["--snapshot"], args["--snapshot-on"], bool(args["--snapshot-exit"])
    if where is None:
        if on is not None or leave:
            raise UsageError("--snapshot-on and --snapshot-exit need --snapshot=DIR")
        return None, None, False
    import re

    from .snapshot import SnapshotError, check_target
    try:
        where = check_target(where, overwrite=bool(args["--force"]))
    except SnapshotError as exc:
        raise UsageError(str(exc)) from None
    if on is not None:
        try:
            on = re.compile(on.encode())
        except re.error as exc:
            raise UsageError(f"--snapshot-on: bad regular expression: {exc}") from None
    return where, on, leave


class RestoreConfig:
    """``lguest-jit restore DIR``: the machine comes from the snapshot; the
    checks that need no device are done here (exit 2 on any)."""

    # What restore takes; the machine itself comes from the snapshot.
    OPTIONS = ("--force", "--verbose", "--stats", "--stats-json", "--tunnet", "--strict", "--profile",
               "--profile-hz")

    def __init__(self, args):
        from .snapshot import SnapshotError, disk_changed, read
        given = [k for k, v in args.items() if k.startswith("-") and v not in (None, False, [])]
        for opt in given:
            if opt == "--hypervisor" and args[opt] in ("auto", "kvm"):
                continue                       # its default, or what a restore uses anyway
            if opt not in self.OPTIONS:
                raise UsageError(f"restore takes only {', '.join(self.OPTIONS)}: the snapshot fixes the rest "
                                 f"({opt} given)")
        try:
            self.restore = read(args["<dir>"])
        except SnapshotError as exc:
            raise UsageError(str(exc)) from None
        m = self.restore["machine"]
        self.mem_mb = m["mem_bytes"] >> 20
        avail = _host_available_mb()
        if self.mem_mb > avail:
            raise UsageError(f"the snapshot's guest has {self.mem_mb} MB, more than the host has free ({avail} MB)")
        self.kernel, self.cmdline, self.initrd = m.get("kernel"), m.get("cmdline", ""), None
        self.blocks = []
        for disk in m["blocks"]:
            why = disk_changed(disk)
            if why is not None and (not args["--force"] or not os.path.isfile(disk["path"])):
                raise UsageError(why + (" (--force to restore anyway)" if os.path.isfile(disk["path"]) else ""))
            self.blocks.append((disk["path"], disk["readonly"]))
        specs = args["--tunnet"] or m["nets"]
        if len(specs) != len(m["nets"]):
            raise UsageError(f"the snapshot's guest has {len(m['nets'])} network device(s); "
                             f"restore got {len(specs)} --tunnet")
        self.nets = _tunnets(specs)
        self.net_specs = list(specs)
        self.rng = m["rng"]
        self.cpus = m.get("cpus", 1)            # snapshots from before --cpus had one
        from .hw.firmware import MAX_CPUS
        if type(self.cpus) is not int or not 1 <= self.cpus <= MAX_CPUS:
            raise UsageError(f"snapshot {args['<dir>']!r}: bad vCPU count {self.cpus!r}")
        from .devices.knobs import Knobs
        try:
            self.knobs = Knobs(**m.get("knobs", {}))     # the devices must offer what the guest negotiated
        except TypeError as exc:
            raise UsageError(f"snapshot {args['<dir>']!r}: unknown device knobs ({exc})") from None
        self.user = self.chroot = None
        self.verbose = bool(args["--verbose"])
        self.strict = m["strict"] or bool(args["--strict"])
        self.stats = bool(args["--stats"])
        self.stats_json = args["--stats-json"]
        if self.stats_json is not None:
            _writable_output(self.stats_json, "--stats-json")
        self.snapshot, self.snapshot_on, self.snapshot_exit = None, None, False
        self.profile, self.profile_hz = _profile_args(args["--profile"], args["--profile-hz"])
        why = _kvm_problem()
        if why is not None:
            raise UsageError(f"restore needs KVM (the lguest backend has no snapshots): {why}")
        self.hypervisor = "kvm"


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
        self.profiler = None
        self.gm = self.bus = None
        self.started = time.monotonic()
        self.snapshot_wanted = False
        self.snapshots_taken = 0
        self.first_run_at = None          # wall clock of the first KVM_RUN (--stats: start-up time)
        self.cmos = self.uart = None
        self.argv = []

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
        restoring = cfg.restore is not None
        if restoring:
            # The snapshot's RAM, copy-on-write; and the vCPU made first, so
            # a snapshot from another host is refused before any device exists.
            self.gm = GuestMemory(cfg.mem_mb << 20, image=cfg.restore["ram_file"])
            self._restore_vm()
        else:
            self.gm = GuestMemory(cfg.mem_mb << 20)
            try:
                self.info = loader.load_linux(self.gm, cfg.kernel, cfg.cmdline, cfg.initrd, cpus=cfg.cpus)
            except loader.LoadError as exc:
                raise UsageError(str(exc)) from None
            except MemoryError:
                # The files were sized at argument time; the host's free memory may have shrunk since.
                raise UsageError(f"kernel {cfg.kernel!r}: not enough host memory to load it") from None
        # MSI-X only where the backend can deliver it (KVM: irqfd + GSI
        # routing); lguest's guests take INTx.
        self.bus = pci.Bus(self.gm, strict=cfg.strict, notify_mode="single" if cfg.hypervisor == "lguest" else "per-queue",
                           fatal=self.fatal, log=self.log if cfg.verbose else None, msix=cfg.hypervisor == "kvm")
        from .devices import Console
        from .devices.net import Net
        out_fd = self._console_watch() if cfg.snapshot_on is not None else 1
        makers = [lambda: Console(output_fd=out_fd, on_fatal=self.fatal, on_interrupt_exit=self._interrupted)]
        makers += [lambda spec=spec: Net(spec, on_fatal=self.fatal) for spec in cfg.nets]
        makers += [lambda p=path, ro=ro: Block(p, readonly=ro, on_fatal=self.fatal) for path, ro in cfg.blocks]
        if cfg.rng:
            makers.append(lambda: Rng(on_fatal=self.fatal))
        for make in makers:
            try:
                d = make()
                d.apply_knobs(cfg.knobs)
            except (OSError, ValueError) as exc:
                # A tap that cannot be made, a bridge that is not there, a
                # disk that cannot be opened: one line, and close() undoes
                # what was built so far.
                raise UsageError(str(exc).splitlines()[0]) from None
            self.devices.append(d)
            self.bus.add_device(d)       # the bus logs slot, BAR0 and irq with --verbose
        from .hw.cmos import CmosRtc
        self.cmos = CmosRtc()
        self.cmos.register(self.bus)     # the guest's wall clock, without Linux's 2 s wait for UIP
        if cfg.hypervisor == "kvm":
            from .hw.kvm import KVM_IRQ_LINE
            from .vcpu import KvmVm
            from .hw.uart import Uart8250
            if restoring:
                self.backend.attach_bus(self.bus)
            else:
                self.backend = KvmVm(self.gm, self.bus, cpus=cfg.cpus)
            # THRE interrupts on IRQ 4: Linux's 8250 driver waits for them
            # before it sends user-space output (polling covers only printk).
            # Output to stdout and the line through KVM_IRQ_LINE, both from
            # the compiled vCPU loop.
            self.uart = Uart8250(out_fd=1, kvm_irq=(self.backend.vm_fd, KVM_IRQ_LINE, 4))
            self.uart.register(self.bus)
            self.backend.claim_reset_port()
            if restoring:
                self._restore_machine()
            else:
                self.backend.setup_boot(self.info)
            if cfg.profile is not None:
                from .hw.profile import Profiler
                self.profiler = Profiler(cfg.profile_hz).attach(self.backend)
        else:
            from .hw.lguest import LguestBackend
            # Pages up to the end of the BAR window trap as MMIO (lguest's device_limit).
            self.backend = LguestBackend(self.gm, self.bus, self.info.entry,
                                         mmio_limit=self.bus.mmio_base + pci.BAR0_SIZE * len(self.bus.devices))

    # -- snapshots ----------------------------------------------------------------------

    def request_snapshot(self) -> None:
        """From any thread or a signal handler: snapshot at the next chance
        (the vCPU is stopped, then ``run`` takes it)."""
        if not self.cfg.snapshot:
            self.log("SIGUSR2 ignored: start the launcher with --snapshot=DIR to take snapshots")
            return
        if not self.snapshot_wanted:
            self.snapshot_wanted = True
            if self.backend is not None:
                self.backend.stop()

    def _console_watch(self) -> int:
        """--snapshot-on: the console writes into a pipe; a thread copies it
        to stdout and asks for the snapshot at the first matching line."""
        from .hw.uart import write_all
        r, w = os.pipe2(os.O_CLOEXEC)
        pattern = self.cfg.snapshot_on

        def pump():
            line, fired = b"", False
            while True:
                try:
                    data = os.read(r, 65536)
                except OSError:
                    return
                if not data:
                    return
                write_all(1, data)
                if not fired:
                    line = (line + data)[-4096:]
                    *done, line = line.split(b"\n")
                    if any(pattern.search(x) for x in done):
                        fired = True
                        self.request_snapshot()

        threading.Thread(target=pump, name="console-watch", daemon=True).start()
        self._watch_fds = (r, w)
        return w

    def _machine(self) -> dict:
        import dataclasses

        from .snapshot import disk_identity
        cfg = self.cfg
        return {"mem_bytes": self.gm.size, "kernel": os.path.abspath(cfg.kernel) if cfg.kernel else None,
                "cmdline": cfg.cmdline, "nets": list(cfg.net_specs), "rng": cfg.rng, "strict": cfg.strict,
                "cpus": cfg.cpus,
                "blocks": [dict(disk_identity(p), readonly=ro) for p, ro in cfg.blocks],
                "knobs": dataclasses.asdict(cfg.knobs),
                "argv": self._boot_argv()}

    def _boot_argv(self) -> list:
        """How to boot this guest afresh (a restored guest that reboots)."""
        if self.cfg.restore is not None:
            return self.cfg.restore["machine"]["argv"]
        out, skip = [], False
        for a in self.argv:
            if skip:
                skip = False
            elif a in ("--snapshot", "--snapshot-on"):
                skip = True
            elif not a.startswith(("--snapshot", "--force")):
                out.append(a)
        return out

    def take_snapshot(self) -> dict:
        """Pause every device at a chain boundary, write the snapshot, resume."""
        from . import snapshot
        from .hw import vmstate
        vm = self.backend
        for d in self.devices:
            d.pause()
        try:
            state = {"machine": self._machine(), "kvm": vmstate.save(vm),
                     "cpuid": snapshot.cpuid_signature(vm.vcpu_cpuid()), "bus": self.bus.save_state(),
                     "uart": self.uart.save_state(), "cmos": self.cmos.save_state()}
            try:
                info = snapshot.write(self.cfg.snapshot, self.gm, state)
            except OSError as exc:
                self.log(f"snapshot to {self.cfg.snapshot!r} failed: {exc.strerror or exc}; the guest carries on")
                return {}
        finally:
            for d in self.devices:
                d.resume()
        self.snapshots_taken += 1
        self.log(f"snapshot written to {self.cfg.snapshot} ({info['ram_bytes_written'] >> 20} MiB of RAM, "
                 f"{info['seconds']:.2f} s)")
        return info

    def _restore_vm(self) -> None:
        from . import snapshot
        from .vcpu import KvmVm
        self.backend = KvmVm(self.gm, cpus=self.cfg.cpus)
        why = snapshot.cpuid_mismatch(self.cfg.restore["cpuid"], snapshot.cpuid_signature(self.backend.vcpu_cpuid()))
        if why is not None:
            raise UsageError(f"snapshot {self.cfg.restore['dir']!r} was taken on another kind of host: {why}")

    def _restore_machine(self) -> None:
        from .hw import vmstate
        st = self.cfg.restore
        # The vCPU and irqchips first: the device threads that start with the
        # bus state may raise interrupts at once.
        try:
            refused = vmstate.restore(self.backend, st["kvm"])      # every vCPU's, in order
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UsageError(f"snapshot {st['dir']!r} does not fit this machine: {exc}") from None
        if refused:
            self.log(f"restore: KVM refused MSRs {', '.join(hex(i) for i in refused)}")
        try:
            self.uart.load_state(st["uart"])
            self.cmos.load_state(st["cmos"])
            self.bus.load_state(st["bus"])
        except (ValueError, KeyError) as exc:
            raise UsageError(f"snapshot {st['dir']!r} does not fit this machine: {exc}") from None

    def _interrupted(self) -> None:
        self.fatal("three ^C within one second: stopping the guest")
        self.interrupted = True

    def run(self) -> int | None:
        from .pci import BadDriver
        self.interrupted = False
        if self.profiler is not None:
            from .hw.profile import ProfileError
            try:
                self.profiler.start()        # aimed at this thread: the one that runs the vCPU
            except (ProfileError, OSError) as exc:
                self.log(f"--profile: cannot sample on this host ({exc}); running without a profile")
                self.profiler = None
        try:
            while True:
                if self.first_run_at is None:
                    self.first_run_at = time.time()
                result = self.backend.run()
                if not (self.snapshot_wanted and result.reason == "stopped" and self.fatal_message is None):
                    break
                self.snapshot_wanted = False
                self.take_snapshot()
                if self.cfg.snapshot_exit:
                    return 0
        except BadDriver as exc:
            self.log(f"bad driver: {exc}" + (f" [{exc.detail}]" if exc.detail else ""))
            return 1
        finally:
            if self.profiler is not None:
                self.profiler.stop()
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

        from .warm import process_start
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
        # The backend knows the moment of its first KVM_RUN (after the
        # compiled loop is loaded); the launcher only when it called it.
        first_run = getattr(self.backend, "first_run_at", None) or self.first_run_at
        started = PROCESS_START if PROCESS_START is not None else process_start()
        out = {"elapsed_s": time.monotonic() - self.started, "rss_bytes": mem.rss,
               "seconds_to_first_run": None if first_run is None else first_run - started,
               "warm_launcher": PROCESS_START is not None,        # forked from `lguest-jit server`
               "context_switches": {"voluntary": ctx.voluntary, "involuntary": ctx.involuntary},
               "threads": threads,
               "queues": {d.name: d.counters() for d in self.devices}}
        if self.bus is not None:
            out["interrupts"] = {t.name: t.interrupt_stats() for t in self.bus.devices}
        if self.backend is not None and hasattr(self.backend, "stats"):
            st = self.backend.stats
            out["exits"] = {"pio": st.pio, "mmio": st.mmio, "total": st.total, "assists": dict(st.assists),
                            "other": st.total - st.pio - st.mmio - sum(st.assists.values())}
        for lp in getattr(self.backend, "loops", ()):
            # Per vCPU: its thread's CPU time while it ran the vCPU, and its exits.
            st = lp.stats
            out.setdefault("vcpus", []).append(
                {"vcpu": lp.index, "user_s": lp.cpu_s[0], "system_s": lp.cpu_s[1],
                 "exits": {"pio": st.pio, "mmio": st.mmio, "total": st.total, "assists": dict(st.assists)}})
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
                print(f"  queue  {dev + '/' + q:28s} " + " ".join(f"{k} {v}" for k, v in c.items()
                                                                if not isinstance(v, dict)), file=stream)
                if "latency" in c:
                    print(f"  latency {dev + '/' + q:27s} {_latency_line(c['latency'])}", file=stream)
        for dev, c in st.get("interrupts", {}).items():
            print(f"  irq    {dev:28s} " + " ".join(f"{k} {v}" for k, v in c.items()), file=stream)
        if "exits" in st:
            print(f"  exits  {st['exits']}", file=stream)
        for v in st.get("vcpus", ()):
            e = v["exits"]
            print(f"  vcpu{v['vcpu']:<3d} user {v['user_s']:8.3f} s  system {v['system_s']:8.3f} s  exits {e['total']} "
                  f"(pio {e['pio']}, mmio {e['mmio']})", file=stream)
        for name, n in list(st.get("exit_registers", {}).items())[:STATS_TOP_REGISTERS]:
            print(f"  access {name:28s} {n}", file=stream)

    def print_profile(self, stream=sys.stderr) -> None:
        """Write --profile's folded stacks and print its report (stderr:
        stdout is the guest's console)."""
        from .hw.profile import report
        for line in report(self.profiler, self.cfg.kernel, self.cfg.profile, self.stats()):
            print(line, file=stream)

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
        for fd in getattr(self, "_watch_fds", ()):
            os.close(fd)       # the console is closed: the watcher sees EOF and ends


def keep_scipy_out() -> None:
    """Numba imports SciPy, where installed, only to look for a BLAS for
    np.dot; no kernel here does linear algebra, and the import costs 0.5 s
    or more of every start (measured: README, "Snapshots").  The process
    that runs a guest never needs SciPy, so it is kept out of it."""
    if "scipy" not in sys.modules:
        sys.modules["scipy"] = None        # import scipy -> ImportError: Numba skips its BLAS check


def _latency_line(lat: dict) -> str:
    """count, p50, p99 of a queue's latency histogram (upper bounds of their
    log2 buckets, so "<=")."""
    if not lat["count"]:
        return "count 0 (sampled 1 in {})".format(lat["sampled_every"])

    def us(ns):
        return f"<= {ns / 1000:.1f} us"
    return f"count {lat['count']} (sampled 1 in {lat['sampled_every']}) p50 {us(lat['p50_ns'])} p99 {us(lat['p99_ns'])}"


def _run_guest(args, argv) -> int:
    keep_scipy_out()
    cfg = RestoreConfig(args) if args["restore"] else RunConfig(args)
    launcher = Launcher(cfg)
    launcher.argv = argv
    usr1 = signal.signal(signal.SIGUSR1, lambda *_: launcher.print_stats())
    usr2 = signal.signal(signal.SIGUSR2, lambda *_: launcher.request_snapshot())
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
        signal.signal(signal.SIGUSR2, usr2)
        try:
            if ran and cfg.stats:
                launcher.print_stats()
            if ran and cfg.stats_json:
                with open(cfg.stats_json, "w") as f:
                    json.dump(launcher.stats(), f, indent=2)
            if ran and launcher.profiler is not None:
                launcher.print_profile()
            if ran and cfg.snapshot and not launcher.snapshots_taken:
                launcher.log(f"no snapshot was taken (--snapshot={cfg.snapshot}"
                             + (": --snapshot-on never matched)" if cfg.snapshot_on is not None else ")"))
        finally:
            launcher.close()
    if status is None:
        # The guest rebooted: start afresh, as lguest re-executes itself (a
        # restored guest boots the way its snapshot's launcher was started).
        again = cfg.restore["machine"]["argv"] if cfg.restore is not None else argv
        os.execv(sys.executable, [sys.executable, "-m", "lguest_jit.main", *again])
    return status


def _server(args) -> int:
    from pathlib import Path

    from .warm import ServerError, serve
    try:
        return serve(Path(args["--socket"]) if args["--socket"] else None)
    except ServerError as exc:
        raise UsageError(f"server: {exc}") from None


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
        if args["server"]:
            return _server(args)
        if PROCESS_START is None and args["--hypervisor"] != "lguest":
            from .warm import run_via_server
            status = run_via_server(argv, verbose=args["--verbose"])
            if status is not None:
                return status
        return _run_guest(args, argv)
    except UsageError as exc:
        print(f"lguest-jit: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
