"""The main job (scripts/boot-default-guest.sh -> guest/run.py) the way a
new user meets it: an empty cache, a build that must install a package
first, and a build that fails.  Fast: the kernel is taken from this
machine's cache (linked into the empty one), never rebuilt here; the
initramfs and the root-disk image are really built.

Not run: `bash scripts/install.sh` (pip install -e of this checkout, tested in tests/test_install.py) and the
boot itself (tests/test_boot_rootfs.py, slow)."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from guest import build  # noqa: E402

# A tiny package apt-get can reinstall in seconds (and the kernel build needs).
APT_PROBE = "bc"


def _env(cache: Path, **extra) -> dict:
    env = dict(os.environ, LGUEST_JIT_CACHE=str(cache), PYTHONPATH=str(ROOT), **extra)
    env.pop(build.ASSUME_MISSING_ENV, None)
    env.update(extra)
    return env


@pytest.fixture
def empty_cache(tmp_path):
    """An empty LGUEST_JIT_CACHE holding only this machine's built kernel."""
    vmlinux = build.cached_kernel()          # the real cache: LGUEST_JIT_CACHE is not set yet
    if vmlinux is None:
        pytest.skip("the default kernel is not built on this machine (python -m guest.build builds it once)")
    cache = tmp_path / "cache"
    kernels = cache / "guest" / "kernels"
    kernels.mkdir(parents=True)
    (kernels / vmlinux.parent.name).symlink_to(vmlinux.parent)
    return cache


def test_main_job_on_an_empty_cache_installs_builds_and_hands_over_clean_json(empty_cache):
    if os.geteuid() != 0:
        pytest.skip("apt-get needs root")
    env = _env(empty_cache, **{build.ASSUME_MISSING_ENV: APT_PROBE})
    # The build alone: stdout is exactly one JSON object, whatever apt-get printed.
    r = subprocess.run([sys.executable, "-m", "guest.build", "--json"], cwd=ROOT, env=env,
                       capture_output=True, timeout=900)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
    got = json.loads(r.stdout)
    assert r.stdout.decode().count("\n") == 1
    assert set(got) == {"vmlinux", "initramfs", "rootfs", "cmdline"}
    assert all(Path(got[k]).is_file() for k in ("vmlinux", "initramfs", "rootfs"))
    assert Path(got["rootfs"]).parent == empty_cache / "guest" / "rootfs"
    # apt-get really ran (reinstalling the probe package), into its log.
    apt_log = (empty_cache / "guest" / "apt.log").read_text()
    assert APT_PROBE in apt_log and ("Setting up" in apt_log or "Unpacking" in apt_log), apt_log[-1000:]
    stderr = r.stderr.decode(errors="replace")
    assert f"installing {APT_PROBE}" in stderr
    assert "\x1b[" not in stderr                  # no live progress when stderr is not a terminal

    # The main job, up to the command it would run (it runs apt-get again:
    # the package is still "missing").
    r = subprocess.run([sys.executable, "-m", "guest.run", "--print"], cwd=ROOT, env=env,
                       capture_output=True, timeout=900)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
    lines = r.stdout.decode().splitlines()
    assert len(lines) == 1, lines
    argv = shlex.split(lines[0])
    user_root = empty_cache / "default-guest-root.img"
    assert argv[1:4] == ["-m", "lguest_jit.main", "--rng"]
    assert argv[4:6] == [f"--block={user_root}", f"--block={empty_cache / 'default-guest-disk.img'}"]
    assert argv[7] == got["vmlinux"] and "root=/dev/vda" in argv and "lguest_jit.workload=selftest" in argv
    assert not any(a.startswith("--initrd") for a in argv)
    # The user's root disk is a copy of the built image, not the image itself.
    assert user_root.read_bytes() == Path(got["rootfs"]).read_bytes()
    assert os.stat(user_root).st_ino != os.stat(got["rootfs"]).st_ino

    # --initramfs: the scratch disk alone, and the initramfs.
    r = subprocess.run([sys.executable, "-m", "guest.run", "--print", "--initramfs", "shell"], cwd=ROOT,
                       env=_env(empty_cache), capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
    argv = shlex.split(r.stdout.decode())
    assert f"--initrd={got['initramfs']}" in argv and "lguest_jit.workload=shell" in argv
    assert not any(a.startswith("root=") for a in argv)


def test_main_job_ends_a_failed_build_with_one_line(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("the cache cannot be made under a file\n")
    r = subprocess.run([sys.executable, "-m", "guest.run", "--print"], cwd=ROOT,
                       env=_env(blocker / "cache"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert r.stdout == ""
    assert "Traceback" not in r.stderr, r.stderr
    err = r.stderr.strip().splitlines()
    # The build says why in one line, the main job ends with one line.
    assert err[-1].startswith("boot-default-guest: the guest build failed"), err
    assert err[-2].startswith("guest: error: "), err


def test_main_job_rejects_unusable_json_in_one_line(tmp_path, monkeypatch):
    from guest import run
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'Reading package lists...'\necho '{\"vmlinux\": 1}'\n")
    fake.chmod(0o755)
    monkeypatch.setattr(run.sys, "executable", str(fake))
    with pytest.raises(run.JobError, match="no usable JSON .*Reading package lists"):
        run.built_guest()


def test_build_progress_shows_only_on_a_terminal(tmp_path):
    code = ("import time; from guest import build\n"
            "with build._progress('long step'):\n    time.sleep(1.5)\n")
    # A pipe: nothing.
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    # A terminal: the step's name and its elapsed time, live.
    import pty
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "-c", code])
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert "guest: long step" in text and "0:00:0" in text, text
