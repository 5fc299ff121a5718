"""The main job (README's first command): build the default guest once
(cached) and boot it under lguest-jit, its console on this terminal.

    bash scripts/boot-default-guest.sh [--initramfs] [--fresh-root] [--print] [WORKLOAD]

By default the guest boots the lguest way, from its root disk:
`--block=<root image> root=/dev/vda`, with a scratch disk (vdb) for the
selftest to write.  The root disk is this user's own copy of the built
image ($LGUEST_JIT_CACHE/default-guest-root.img, made on first use), so what
the guest writes to / persists from boot to boot; the built image in the
guest cache is never booted.  --initramfs boots the initramfs instead.

Every failure is one `boot-default-guest: ...` line on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from guest.build import cache_root, default_cmdline  # noqa: E402 - after the path above
PROG = "boot-default-guest"
WORKLOADS = ("selftest", "shell", "boot", "persist")
MEM_MB = 256
SCRATCH_MIB = 64


class JobError(Exception):
    """One line for the user."""


def built_guest() -> dict:
    """Run `python -m guest.build --json` (its messages and progress go to
    our stderr, as they happen) and return the paths it hands over."""
    r = subprocess.run([sys.executable, "-m", "guest.build", "--json"], cwd=ROOT,
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    if r.returncode != 0:
        raise JobError(f"the guest build failed (exit status {r.returncode}; its error is above)")
    try:
        got = json.loads(r.stdout)
        paths = {k: Path(got[k]) for k in ("vmlinux", "initramfs", "rootfs")}
    except (ValueError, KeyError, TypeError):
        head = r.stdout[:80].decode(errors="replace")
        raise JobError(f"the guest build handed over no usable JSON (stdout began {head!r})") from None
    for what, p in paths.items():
        if not p.is_file():
            raise JobError(f"the guest build named a {what} that does not exist: {p}")
    return paths


def user_root_disk(pristine: Path, fresh: bool) -> Path:
    """This user's working copy of the root-disk image (sparse copy of the
    built one on first use, or when `fresh`)."""
    disk = cache_root() / "default-guest-root.img"
    if fresh or not disk.is_file():
        disk.parent.mkdir(parents=True, exist_ok=True)
        tmp = disk.with_name(disk.name + ".tmp")
        subprocess.run(["cp", "--sparse=always", str(pristine), str(tmp)], check=True,
                       stdout=subprocess.DEVNULL)
        os.replace(tmp, disk)
        print(f"{PROG}: root disk {disk} (a copy of the built image; --fresh-root starts over)",
              file=sys.stderr)
    return disk


def scratch_disk() -> Path:
    disk = cache_root() / "default-guest-disk.img"
    if not disk.is_file():
        disk.parent.mkdir(parents=True, exist_ok=True)
        with open(disk, "wb") as f:
            f.truncate(SCRATCH_MIB << 20)
    return disk


def launcher_argv(args) -> list[str]:
    g = built_guest()
    argv = [sys.executable, "-m", "lguest_jit.main", "--rng"]
    tuning = False if args.no_host_tuning else None
    if args.initramfs:
        cmdline = default_cmdline(args.workload, "hvc0", host_tuning=tuning)
        argv += [f"--block={scratch_disk()}", f"--initrd={g['initramfs']}"]
    else:
        cmdline = default_cmdline(args.workload, "hvc0", root="/dev/vda", host_tuning=tuning)
        argv += [f"--block={user_root_disk(g['rootfs'], args.fresh_root)}", f"--block={scratch_disk()}"]
    return argv + [str(MEM_MB), str(g["vmlinux"]), *cmdline.split()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bash scripts/boot-default-guest.sh",
                                 description="Build the default guest (once) and boot it under lguest-jit.")
    ap.add_argument("workload", nargs="?", default="selftest", choices=WORKLOADS)
    ap.add_argument("--initramfs", action="store_true", help="boot the initramfs instead of the root disk")
    ap.add_argument("--fresh-root", action="store_true", help="start again from the built root-disk image")
    ap.add_argument("--no-host-tuning", action="store_true",
                    help="leave out the command-line words added on software-KVM hosts (guest/build.py)")
    ap.add_argument("--print", dest="print_only", action="store_true",
                    help="print the lguest-jit command line instead of running it")
    args = ap.parse_args(argv)
    try:
        cmd = launcher_argv(args)
    except (JobError, OSError, subprocess.CalledProcessError, ValueError) as e:
        msg = str(e).strip().splitlines()
        print(f"{PROG}: {msg[0] if msg else type(e).__name__}", file=sys.stderr)
        return 1
    if args.print_only:
        print(shlex.join(cmd), flush=True)
        return 0
    os.chdir(ROOT)          # lguest_jit from this checkout, also after a reboot's re-exec
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    sys.exit(main())
