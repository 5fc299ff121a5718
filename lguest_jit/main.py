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

import importlib
import json
import sys

from docopt import DocoptExit, docopt

from . import __version__

BENCHMARKS = ("vring", "pci", "decode", "blk", "rng", "exits", "boot")


class UsageError(Exception):
    """Bad input from the command line: one line, non-zero exit, no traceback."""


def _bench(args) -> int:
    what = args["<what>"]
    names = BENCHMARKS if what == "all" else (what,)
    if what != "all" and what not in BENCHMARKS:
        raise UsageError(f"unknown benchmark {what!r}; choose from {', '.join(BENCHMARKS)} or all")
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
    if args["--json"]:
        print(json.dumps(result, indent=2))
    else:
        _print_table(reports)
    return 0


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


def main(argv=None) -> int:
    try:
        args = docopt(__doc__, argv=argv, version=f"lguest-jit {__version__}")
    except DocoptExit as exc:
        print(f"lguest-jit: bad arguments (see --help)\n{exc.usage if hasattr(exc, 'usage') else ''}".rstrip(),
              file=sys.stderr)
        return 2
    try:
        if args["bench"]:
            return _bench(args)
        raise UsageError("running a guest is not available yet in this build")
    except UsageError as exc:
        print(f"lguest-jit: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
