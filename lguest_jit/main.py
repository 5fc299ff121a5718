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
{device_options}
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
{knob_options}
  --param=SPEC          bench sweep: KNOB=V1,V2,... (a knob above, without --;
                        for guest also cpus=N1,N2,...: --cpus per boot).
  --socket=PATH         server: where to listen (default: $LGUEST_JIT_SERVER,
                        else $XDG_RUNTIME_DIR/lguest-jit.sock, else
                        ~/.cache/lguest-jit/server.sock).
  --json                Benchmarks: print JSON instead of a table.
  --quick               Benchmarks: shorter measurements.
  --plot=FILE           Benchmarks: draw the comparison as a PNG.
  -h --help             Show this help.
  --version             Show the version.

Benchmarks: vring, pci, decode, blk, rng, net, vsock, exits, boot, restore, guest, or all.
bench sweep runs one device benchmark (blk, rng, net) per value of a knob, or
the guest workload (guest) with a fresh boot per value.

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
from .devices.knobs import KNOBS, parse_knobs, parse_whole, with_net_mtu, with_queue_counts
from .hw.hosts import LGUEST_DEVICE, default_sample_hz, kvm_max_vcpus, lguest_available, max_sample_hz, usable_cpus
from .machine import (DEVICE_OPTIONS, MAX_MEM_MB, MMIO_WINDOW_MB, Machine, MachineError, check_mem_mb, descs, device_descs,
                      readable_file)


def _option_lines(rows) -> str:
    """docopt option lines, the description wrapped under its column."""
    import textwrap
    out = []
    for spec, text in rows:
        lines = textwrap.wrap(text, 80 - 24)
        out.append(f"  {spec:<20}  {lines[0]}")
        out.extend(" " * 24 + x for x in lines[1:])
    return "\n".join(out)


# The options of devices and knobs come from their one table each.
__doc__ = __doc__.format(
    device_options=_option_lines((d.option, d.help) for d in DEVICE_OPTIONS),
    knob_options=_option_lines((f"--{name}={meta}", text) for name, (_, _, meta, text) in KNOBS.items()))

BENCHMARKS = ("vring", "pci", "decode", "blk", "rng", "net", "vsock", "exits", "boot", "restore", "guest", "smp")


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
    why = sweep.unsweepable(param, what)
    if why:
        raise UsageError(f"bench sweep: {why}")
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

def _host_available_mb() -> int:
    import psutil
    return psutil.virtual_memory().available // (1 << 20)


def _input_size(path: str, what: str, limit: int, limit_what: str) -> int:
    """The size of input file ``path``, refused (one line) when it is not a
    regular file, is empty, or is larger than ``limit`` bytes: checked with
    stat alone, before the launcher creates or reads anything."""
    st = os.stat(readable_file(path, what))
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


def _check_host_for(machine: Machine) -> None:
    """What the host must offer for the devices described."""
    if machine.of_kind("net") and not os.path.exists("/dev/net/tun"):
        raise UsageError("--tunnet needs /dev/net/tun, which this host lacks")


def _mem_mb(text: str) -> int:
    try:
        mb = parse_whole(text, "memory size", "megabytes")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if mb <= 0:
        raise UsageError(f"memory size must be positive, got {mb} MB")
    if mb > MAX_MEM_MB:
        return check_mem_mb(mb)           # absurd, whatever the host has
    avail = _host_available_mb()          # then: on a small host this is the reason
    if mb > avail:
        raise UsageError(f"memory size {mb} MB is more than the host has free ({avail} MB)")
    return check_mem_mb(mb)


# Options a guest's boot command line may not carry into a snapshot (and a
# snapshot's may not hold): each run decides its own outputs and snapshots.
PER_RUN_OPTIONS = ("--snapshot", "--snapshot-on", "--snapshot-exit", "--force", "--stats-json", "--profile",
                   "--profile-hz")


def boot_argv(argv) -> list:
    """How to boot this guest afresh (a restored guest that reboots): the
    run's arguments without the per-run ones."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in PER_RUN_OPTIONS:
            skip = "=" not in a and name not in ("--snapshot-exit", "--force")
            continue
        out.append(a)
    return out


def check_boot_argv(argv) -> list:
    """A snapshot's boot arguments, through the command line's parser and
    checks (nothing created): a plain run, no per-run option, its files
    and knobs acceptable to this launcher."""
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise UsageError("boot arguments are not a list of strings")
    try:
        args = docopt(__doc__, argv=argv, default_help=False, version=None)
    except (DocoptExit, SystemExit):
        raise UsageError("its boot arguments are not a launcher command line") from None
    if args["bench"] or args["server"] or args["restore"] or args["--help"] or args["--version"]:
        raise UsageError("its boot arguments are not a plain run")
    given = [o for o in PER_RUN_OPTIONS if args.get(o) not in (None, False, [])]
    if given:
        raise UsageError(f"its boot arguments hold {given[0]}, which only the command line may give")
    # The values a boot would take, checked now; the files it names are
    # checked again by the launcher the reboot starts (a plain run).
    _mem_mb(args["<mem-in-mb>"])
    _cpus_arg(args["--cpus"])
    try:
        parse_knobs({name: args[f"--{name}"] for name in KNOBS})
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for d in DEVICE_OPTIONS:
        given = args[d.option.split()[-1].split("=")[0]]
        for text in (given if d.repeat else ([given] if given else [])):
            d.parse(text)
    if args["--hypervisor"] not in HYPERVISORS:
        raise UsageError(f"--hypervisor must be kvm, lguest or auto, not {args['--hypervisor']!r}")
    return list(argv)


def _machine_from_args(args) -> Machine:
    mem_mb = _mem_mb(args["<mem-in-mb>"])
    kernel = readable_file(args["<vmlinux>"], "kernel")
    initrd = args["--initrd"]
    if initrd is not None:
        _input_size(initrd, "initrd", mem_mb << 20, "guest RAM")
    try:
        knobs = parse_knobs({name: args[f"--{name}"] for name in KNOBS})
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    cpus = _cpus_arg(args["--cpus"])
    from .devices.tunspec import BRIDGE_PREFIX
    from .hw.hosts import software_kvm
    knobs = with_net_mtu(knobs, args["--hypervisor"] != "lguest" and software_kvm() is not None,
                         any(t.startswith(BRIDGE_PREFIX) for t in args["--tunnet"] or ()))
    # Queue counts left unset follow the vCPUs, --net-mtu=auto its value on
    # this host: the machine (and so a snapshot) records what the devices
    # were built with.
    return Machine(mem_bytes=mem_mb << 20, kernel=os.path.abspath(kernel),
                   initrd=os.path.abspath(initrd) if initrd else None, cmdline=" ".join(args["<args>"]),
                   strict=bool(args["--strict"]), knobs=with_queue_counts(knobs, cpus), devices=device_descs(args),
                   cpus=cpus)


class RunConfig:
    """Every argument, validated before anything is created: the machine
    (``self.machine``, what the launcher builds) and how to run it."""

    def __init__(self, args):
        self.machine = _machine_from_args(args)
        mem_mb = self.machine.mem_bytes >> 20
        avail = _host_available_mb()
        if mem_mb > avail:
            raise UsageError(f"memory size {mem_mb} MB is more than the host has free ({avail} MB)")
        # The whole kernel file is read into host memory; an initrd must fit in guest RAM.
        _input_size(self.machine.kernel, "kernel", avail << 20, "the host has free")
        _check_host_for(self.machine)
        self.cpus = self.machine.cpus
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
        self.stats = bool(args["--stats"])
        self.stats_json = args["--stats-json"]
        if self.stats_json is not None:
            _writable_output(self.stats_json, "--stats-json")
        self.profile, self.profile_hz = _profile_args(args["--profile"], args["--profile-hz"])
        self.snapshot, self.snapshot_on, self.snapshot_exit = _snapshot_options(args)
        self.restore = None
        self.boot_argv = None             # set by main: this run's own arguments
        # Last, the check that imports Numba (the KVM backend): every
        # cheaper mistake has been reported by now.
        self.hypervisor = _choose_hypervisor(args["--hypervisor"])
        if self.machine.cpus > 1 and self.hypervisor != "kvm":
            raise UsageError(f"--cpus={self.machine.cpus}: the lguest backend runs one vCPU; more need KVM")
        if self.profile is not None and self.hypervisor != "kvm":
            raise UsageError("--profile samples a KVM vCPU; the lguest backend has no registers to sample")
        if self.snapshot and self.hypervisor != "kvm":
            raise UsageError("--snapshot needs the KVM backend: the lguest backend has no snapshots")
        if self.snapshot:
            from .snapshot import SnapshotError, key
            try:
                self.snapshot_key = key()          # now: before privileges are dropped
            except SnapshotError as exc:
                raise UsageError(str(exc)) from None


def _cpus_arg(value: str | None) -> int:
    """--cpus=N: 1 to what both KVM (KVM_CAP_MAX_VCPUS) and the MP table
    (8-bit APIC ids) allow.  More vCPUs than host CPUs is allowed (they
    take turns), and said once."""
    if value is None:
        return 1
    from .hw.firmware import MAX_CPUS       # standard library only
    try:
        n = parse_whole(value, f"--cpus={value}", "vCPUs")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
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
        rate = parse_whole(hz, "--profile-hz", "samples per second")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
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
        # Matched against the console's bytes: the argument's own bytes
        # (os.fsencode keeps ones that are not UTF-8).  re.compile raises
        # more than re.error on hostile patterns: a huge repeat count is an
        # OverflowError, deep nesting a RecursionError.
        try:
            on = re.compile(os.fsencode(on))
        except (re.error, OverflowError, RecursionError, MemoryError, ValueError) as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UsageError(f"--snapshot-on: bad regular expression: {why}") from None
    return where, on, leave


class RestoreConfig:
    """``lguest-jit restore DIR``: the machine comes from the snapshot; the
    checks that need no device are done here (exit 2 on any)."""

    # What restore takes; the machine itself comes from the snapshot.
    OPTIONS = ("--force", "--verbose", "--stats", "--stats-json", "--tunnet", "--strict", "--profile",
               "--profile-hz")

    def __init__(self, args):
        import dataclasses

        from .snapshot import SnapshotError, disk_changed, read
        given = [k for k, v in args.items() if k.startswith("-") and v not in (None, False, [])]
        for opt in given:
            if opt == "--hypervisor" and args[opt] in ("auto", "kvm"):
                continue                       # its default, or what a restore uses anyway
            if opt not in self.OPTIONS:
                raise UsageError(f"restore takes only {', '.join(self.OPTIONS)}: the snapshot fixes the rest "
                                 f"({opt} given)")
        where = args["<dir>"]
        try:
            self.restore = read(where)         # authenticated, every field read through the schema
            machine = self.restore["machine"]
            for disk in self.restore["disks"]:
                why = disk_changed(disk)
                if why is not None and not args["--force"]:
                    raise UsageError(why + " (--force to restore anyway)")
            self.boot_argv = check_boot_argv(self.restore["boot_argv"])
        except (SnapshotError, MachineError) as exc:
            raise UsageError(f"snapshot {where!r}: {exc}" if not str(exc).startswith("snapshot ") else str(exc)) \
                from None
        except UsageError as exc:
            raise UsageError(f"snapshot {where!r}: {exc}") from None
        mem_mb = machine.mem_bytes >> 20
        avail = _host_available_mb()
        if mem_mb > avail:
            raise UsageError(f"the snapshot's guest has {mem_mb} MB, more than the host has free ({avail} MB)")
        nets = machine.of_kind("net")
        if args["--tunnet"]:
            if len(args["--tunnet"]) != len(nets):
                raise UsageError(f"the snapshot's guest has {len(nets)} network device(s); "
                                 f"restore got {len(args['--tunnet'])} --tunnet")
            # --tunnet replaces the snapshot's specs, in order.
            new = iter(descs("net", args["--tunnet"]))
            machine = dataclasses.replace(machine, devices=tuple(next(new) if d.kind == "net" else d
                                                                 for d in machine.devices))
        if args["--strict"]:
            machine = dataclasses.replace(machine, strict=True)
        _check_host_for(machine)
        self.machine = machine
        self.cpus = machine.cpus
        self.user = self.chroot = None
        self.verbose = bool(args["--verbose"])
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
        # In a child of the warm launcher: when its client started (seconds
        # since the epoch); --stats counts start-up from there.
        self.client_started = None

    def log(self, line: str) -> None:
        print(f"lguest-jit: {line}", file=sys.stderr, flush=True)

    def fatal(self, message: str) -> None:
        """A device thread died or a strict-mode driver error: stop the guest."""
        if self.fatal_message is None:
            self.fatal_message = message
        if self.backend is not None:
            self.backend.stop()

    def build(self) -> None:
        """Memory, bus, devices and backend from the machine description
        (``cfg.machine``): booted afresh, or restored from ``cfg.restore``."""
        from . import pci
        from .devices import DeviceEnv, device_class
        from .hw import loader
        from .hw.memory import GuestMemory
        cfg, m = self.cfg, self.cfg.machine
        restoring = cfg.restore is not None
        if restoring:
            # The snapshot's RAM, copy-on-write; and the vCPU made first, so
            # a snapshot from another host is refused before any device exists.
            self.gm = GuestMemory(m.mem_bytes, image=cfg.restore["ram_file"])
            self._restore_vm()
        else:
            self.gm = GuestMemory(m.mem_bytes)
            try:
                from .hw.cpuid import guest_cmdline
                cmdline = guest_cmdline(m.cmdline, self._hide_erms())
                if cfg.hypervisor == "kvm":
                    # The TSC frequency where Linux ignores its CPUID leaves (hw/firmware.py).
                    from .hw.firmware import with_tsc_khz_param
                    from .hw.kvm import guest_tsc
                    cmdline = with_tsc_khz_param(cmdline, *guest_tsc())
                self.info = loader.load_linux(self.gm, m.kernel, cmdline, m.initrd, cpus=m.cpus)
            except loader.LoadError as exc:
                raise UsageError(str(exc)) from None
            except MemoryError:
                # The files were sized at argument time; the host's free memory may have shrunk since.
                raise UsageError(f"kernel {m.kernel!r}: not enough host memory to load it") from None
        # MSI-X only where the backend can deliver it (KVM: irqfd + GSI
        # routing); lguest's guests take INTx.
        self.bus = pci.Bus(self.gm, strict=m.strict, notify_mode="single" if cfg.hypervisor == "lguest" else "per-queue",
                           fatal=self.fatal, log=self.log if cfg.verbose else None, msix=cfg.hypervisor == "kvm")
        out_fd = self._console_watch() if cfg.snapshot_on is not None else 1
        env = DeviceEnv(on_fatal=self.fatal, console_fd=out_fd, on_interrupt=self._interrupted, knobs=m.knobs)
        for desc in m.devices:
            try:
                d = device_class(desc.kind).from_options(desc.options, env)
                d.apply_knobs(m.knobs)
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
                self.backend = KvmVm(self.gm, self.bus, cpuid_hook=self._cpuid_hook(), cpus=m.cpus)
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

    def take_snapshot(self) -> dict:
        """Pause every device at a chain boundary, write the snapshot, resume."""
        from . import snapshot
        from .hw import vmstate
        vm = self.backend
        for d in self.devices:
            d.pause()
        try:
            m = self.cfg.machine
            state = {"machine": m.to_fields(),
                     "disks": [snapshot.disk_identity(p) for d in m.devices for p in d.files()],
                     "boot_argv": self.cfg.boot_argv, "kvm": vmstate.save(vm),
                     "cpuid": snapshot.cpuid_signature(vm.vcpu_cpuid()), "bus": self.bus.save_state(),
                     "uart": self.uart.save_state(), "cmos": self.cmos.save_state()}
            try:
                info = snapshot.write(self.cfg.snapshot, self.gm, state, self.cfg.snapshot_key)
            except (OSError, snapshot.SnapshotError) as exc:
                self.log(f"snapshot to {self.cfg.snapshot!r} failed: {getattr(exc, 'strerror', None) or exc}"
                         + ("" if self.cfg.snapshot_exit else "; the guest carries on"))
                return {}
        finally:
            for d in self.devices:
                d.resume()
        self.snapshots_taken += 1
        self.log(f"snapshot written to {self.cfg.snapshot} ({info['ram_bytes_written'] >> 20} MiB of RAM, "
                 f"{info['seconds']:.2f} s)")
        return info

    def _hide_erms(self) -> bool:
        from .hw.cpuid import hides_fast_strings
        from .hw.hosts import software_kvm
        return self.cfg.hypervisor == "kvm" and hides_fast_strings(self.cfg.machine.knobs.erms, software_kvm())

    def _cpuid_hook(self):
        from .hw.cpuid import without_fast_strings
        return without_fast_strings if self._hide_erms() else None

    def _restore_vm(self) -> None:
        from . import snapshot
        from .vcpu import KvmVm
        self.backend = KvmVm(self.gm, cpuid_hook=self._cpuid_hook(), cpus=self.cfg.machine.cpus)
        why = snapshot.cpuid_mismatch(self.cfg.restore["cpuid"], snapshot.cpuid_signature(self.backend.vcpu_cpuid()))
        if why is not None:
            raise UsageError(f"snapshot {self.cfg.restore['dir']!r} was taken on another kind of host: {why}")

    def _restore_machine(self) -> None:
        from .hw import vmstate
        from .hw.kvm import KvmError
        st = self.cfg.restore
        try:
            # The vCPU and irqchips first: the device threads that start with
            # the bus state may raise interrupts at once.
            refused = vmstate.restore(self.backend, st["kvm"])
            self.uart.load_state(st["uart"])
            self.cmos.load_state(st["cmos"])
            self.bus.load_state(st["bus"])
        except KvmError as exc:
            raise UsageError(f"snapshot {st['dir']!r}: KVM refused its state ({exc})") from None
        except ValueError as exc:       # hw.fields.FieldError among them
            raise UsageError(f"snapshot {st['dir']!r} does not fit this machine: {exc}") from None
        if refused:
            self.log(f"restore: KVM refused MSRs {', '.join(hex(i) for i in refused)}")

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
                written = self.take_snapshot()
                if self.cfg.snapshot_exit:
                    return 0 if written else 1      # a failed snapshot is a failed --snapshot-exit run
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
        started = self.client_started if self.client_started is not None else process_start()
        out = {"elapsed_s": time.monotonic() - self.started, "rss_bytes": mem.rss,
               "seconds_to_first_run": None if first_run is None else first_run - started,
               "started_at": started,     # what the start-up counts from: the exec of the process the user ran
               "warm_launcher": self.client_started is not None,        # forked from `lguest-jit server`
               "context_switches": {"voluntary": ctx.voluntary, "involuntary": ctx.involuntary},
               "threads": threads,
               "queues": {d.name: d.counters() for d in self.devices}}
        if self.bus is not None:
            out["interrupts"] = {t.name: t.interrupt_stats() for t in self.bus.devices}
        if self.backend is not None and hasattr(self.backend, "stats"):
            so_far = getattr(self.backend, "stats_so_far", None)
            st = so_far() if so_far is not None else self.backend.stats
            out["exits"] = {"pio": st.pio, "mmio": st.mmio, "total": st.total, "assists": dict(st.assists),
                            "other": st.total - st.pio - st.mmio - sum(st.assists.values())}
        for lp in getattr(self.backend, "loops", ()):
            # Per vCPU: its thread's CPU time while it ran the vCPU, and its exits (so far: SIGUSR1 mid-run).
            st, user, system = lp.so_far()
            out.setdefault("vcpus", []).append(
                {"vcpu": lp.index, "user_s": user, "system_s": system,
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

    def on_usr1(self) -> None:
        """SIGUSR1: the stats on stderr, and --stats-json and --profile's
        folded stacks rewritten with the counts so far (each replaced whole:
        a reader never sees half a file).  `bench guest` takes one at each
        workload boundary and subtracts."""
        self.print_stats()
        outputs = []
        if self.cfg.stats_json:
            outputs.append((self.cfg.stats_json, lambda: json.dumps(self.stats(), indent=2)))
        if self.profiler is not None and self.cfg.profile:
            from .hw.profile import folded_now
            outputs.append((self.cfg.profile, lambda: folded_now(self.profiler, self.cfg.machine.kernel)))
        for path, text in outputs:
            tmp = f"{path}.usr1"
            try:
                with open(tmp, "w") as f:
                    f.write(text())
                os.replace(tmp, path)
            except OSError as exc:
                self.log(f"SIGUSR1: could not write {path}: {exc.strerror}")

    def print_profile(self, stream=sys.stderr) -> None:
        """Write --profile's folded stacks and print its report (stderr:
        stdout is the guest's console)."""
        from .hw.profile import report
        for line in report(self.profiler, self.cfg.machine.kernel, self.cfg.profile, self.stats()):
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


def _latency_line(lat: dict) -> str:
    """count, p50, p99 of a queue's latency histogram (upper bounds of their
    log2 buckets, so "<=")."""
    if not lat["count"]:
        return "count 0 (sampled 1 in {})".format(lat["sampled_every"])

    def us(ns):
        return f"<= {ns / 1000:.1f} us"
    return f"count {lat['count']} (sampled 1 in {lat['sampled_every']}) p50 {us(lat['p50_ns'])} p99 {us(lat['p99_ns'])}"


def _run_guest(args, argv, started) -> int:
    from . import keep_scipy_out
    keep_scipy_out()
    cfg = RestoreConfig(args) if args["restore"] else RunConfig(args)
    launcher = Launcher(cfg)
    if cfg.restore is None:
        cfg.boot_argv = boot_argv(argv)
    launcher.client_started = started
    usr1 = signal.signal(signal.SIGUSR1, lambda *_: launcher.on_usr1())
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
        again = cfg.boot_argv if cfg.restore is not None else argv
        os.execv(sys.executable, [sys.executable, "-m", "lguest_jit.main", *again])
    return status


def _server(args) -> int:
    from pathlib import Path

    from .warm import ServerError, serve
    try:
        return serve(main, Path(args["--socket"]) if args["--socket"] else None)
    except ServerError as exc:
        raise UsageError(f"server: {exc}") from None


def main(argv=None, started: float | None = None) -> int:
    """The launcher.  ``started``: set by the warm launcher's child (when
    its client started); such a run never asks a server again."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = docopt(__doc__, argv=argv, version=f"lguest-jit {__version__}")
    except DocoptExit:
        print("lguest-jit: bad arguments; usage: lguest-jit [options] <mem-in-mb> <vmlinux> [<args>...] "
              "(see --help)", file=sys.stderr)
        return 2
    try:
        from . import CACHE_PROBLEM
        if CACHE_PROBLEM is not None:
            # Numba would unpickle another user's files as ours: refused as ssh refuses such keys.
            raise UsageError(CACHE_PROBLEM)
        if args["bench"]:
            return _bench(args)
        if args["server"]:
            return _server(args)
        if started is None and args["--hypervisor"] != "lguest":
            from .warm import run_via_server
            status = run_via_server(argv, verbose=args["--verbose"])
            if status is not None:
                return status
        return _run_guest(args, argv, started)
    except (UsageError, MachineError) as exc:
        print(f"lguest-jit: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
