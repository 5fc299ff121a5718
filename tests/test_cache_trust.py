"""The kernel cache directory is trusted only when it is the user's own:
Numba unpickles what it finds there, so a directory another user owns or
can write (or one under such a directory) would run that user's code as
us.  Refused with one line and exit 2, as ssh refuses such keys."""
import os
import subprocess
import sys

import pytest

from lguest_jit.hw.pathtrust import path_problem

STRANGER = 65534        # nobody


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private directory to build trees in (0700, ours); HOME elsewhere
    so the walk goes up to / (through /tmp, sticky)."""
    d = tmp_path / "t"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("HOME", "/nonexistent-home")
    return d


def test_our_private_tree_is_trusted(home):
    (home / "a" / "b").mkdir(parents=True)
    assert path_problem(str(home / "a" / "b")) is None
    assert path_problem(str(home / "a" / "b" / "not" / "yet")) is None     # created by us later


@pytest.mark.parametrize("mode,words", [(0o777, "writable by others"), (0o770, "writable by its group"),
                                        (0o1777, "writable by others")])
def test_a_cache_others_can_write_is_refused(home, mode, words):
    d = home / "cache"
    d.mkdir()
    os.chmod(d, mode)
    assert words in path_problem(str(d))


def test_a_parent_others_can_write_is_refused_unless_sticky(home):
    parent = home / "shared"
    parent.mkdir()
    (parent / "cache").mkdir()
    os.chmod(parent, 0o777)             # anyone could rename our cache away and put theirs in its place
    assert "shared is writable by others" in path_problem(str(parent / "cache"))
    assert "shared is writable by others" in path_problem(str(parent / "new"))
    os.chmod(parent, 0o1777)            # sticky, like /tmp: only we may rename what is ours
    assert path_problem(str(parent / "cache")) is None
    os.chown(parent / "cache", STRANGER, STRANGER)
    assert f"owned by uid {STRANGER}" in path_problem(str(parent / "cache"))


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_a_cache_or_parent_owned_by_another_user_is_refused(home):
    d = home / "p" / "cache"
    d.mkdir(parents=True)
    os.chown(d, STRANGER, STRANGER)
    assert f"cache is owned by uid {STRANGER}" in path_problem(str(d))
    os.chown(d, 0, 0)
    os.chown(home / "p", STRANGER, STRANGER)
    assert f"p is owned by uid {STRANGER}" in path_problem(str(d))


def test_symlinks_are_followed_to_what_they_name(home):
    real = home / "real"
    real.mkdir()
    os.chmod(real, 0o777)
    (home / "link").symlink_to(real)
    assert "real is writable by others" in path_problem(str(home / "link"))


def _launch(env_changes, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "LGUEST_JIT_CACHE")}
    env.update(env_changes, LGUEST_JIT_SERVER="off")
    return subprocess.run([sys.executable, "-m", "lguest_jit.main", "64", str(tmp_path / "missing")], env=env,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("var", ["LGUEST_JIT_CACHE", "NUMBA_CACHE_DIR"])
def test_the_launcher_refuses_an_unsafe_cache_in_one_line(tmp_path, var):
    bad = tmp_path / "cache"
    bad.mkdir()
    os.chmod(bad, 0o777)
    r = _launch({var: str(bad)}, tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("lguest-jit: the kernel cache "), r.stderr
    assert "not safe to load code from" in r.stderr and "writable by others" in r.stderr
    assert os.listdir(bad) == []                          # nothing created in it either
    os.chmod(bad, 0o755)                                  # the same directory, now ours alone
    r = _launch({var: str(bad)}, tmp_path)
    assert r.returncode == 2 and "missing' does not exist" in r.stderr, r.stderr
