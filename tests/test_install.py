"""scripts/install.sh, the main job's install step: installs once, again only
when pyproject.toml changed or another checkout took over, prints nothing
from pip unless it fails (then one line naming the log).

Runs the real script and the real pip on a tiny project of the same name,
into a throw-away venv that sees this Python's packages (so nothing is
downloaded and the venv needs no pip of its own)."""
import os
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = """[build-system]
requires = []
build-backend = "tiny_backend"
backend-path = ["."]

[project]
name = "lguest-jit"
version = "0.0.1"
"""
# An in-tree build backend with no requirements (PEP 517/660 build_editable):
# pip needs nothing from an index, so each install takes a second or two.
BACKEND = """import zipfile

DIST = "lguest_jit-0.0.1"


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    name = DIST + "-py3-none-any.whl"
    files = {DIST + ".dist-info/METADATA": "Metadata-Version: 2.1\\nName: lguest-jit\\nVersion: 0.0.1\\n",
             DIST + ".dist-info/WHEEL": "Wheel-Version: 1.0\\nGenerator: test\\nRoot-Is-Purelib: true\\n"
                                        "Tag: py3-none-any\\n"}
    with zipfile.ZipFile(wheel_directory + "/" + name, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
        z.writestr(DIST + ".dist-info/RECORD", "".join(p + ",,\\n" for p in [*files, DIST + ".dist-info/RECORD"]))
    return name
"""


def _project(where: Path) -> Path:
    (where / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "install.sh", where / "scripts")
    (where / "pyproject.toml").write_text(PYPROJECT)
    (where / "tiny_backend.py").write_text(BACKEND)
    return where


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    if shutil.which("sha256sum") is None:
        pytest.skip("needs sha256sum (coreutils)")
    base = tmp_path_factory.mktemp("install")
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(base / "venv")
    e = dict(os.environ, PYTHON=str(base / "venv" / "bin" / "python"), LGUEST_JIT_CACHE=str(base / "cache"),
             PIP_NO_INPUT="1", PIP_NO_INDEX="1")
    e.pop("PYTHONPATH", None)       # a checkout on the path would answer for the venv's install
    return base, e


def install(project: Path, env: dict, *args):
    return subprocess.run(["bash", str(project / "scripts" / "install.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=600)


def installed_from(env: dict) -> str:
    code = "from importlib import metadata; print(metadata.distribution('lguest-jit').read_text('direct_url.json'))"
    return subprocess.run([env["PYTHON"], "-c", code], cwd="/", env=env, capture_output=True, text=True).stdout


def test_installs_once_then_again_only_when_needed(env):
    base, e = env
    a = _project(base / "a")
    log = base / "cache" / "install.log"

    def quiet_install(*args):
        r = install(a, e, *args)
        assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), r.stderr
        assert str(a) in installed_from(e)
        return log.stat().st_mtime_ns

    first = quiet_install()
    assert log.read_text().splitlines()[0].split("  (")[0].endswith(f"pip install -e {a}")   # no test extras
    assert quiet_install() == first         # nothing changed: pip did not run

    second = quiet_install("--test")        # the test extras are another install...
    assert second != first and f"pip install -e {a}[test]" in log.read_text().splitlines()[0]
    assert quiet_install() == second        # ...which covers the main one

    with open(a / "pyproject.toml", "a") as f:
        f.write("# changed\n")
    third = quiet_install()
    assert third != second

    # Another checkout installed over it: the first one's next start takes it back.
    b = _project(base / "b")
    assert install(b, e).returncode == 0 and str(b) in installed_from(e)
    assert quiet_install() != third


def test_a_failed_install_is_one_line_naming_the_log(env):
    base, e = env
    c = _project(base / "c")
    (c / "pyproject.toml").write_text(PYPROJECT.replace("[project]", "[project"))     # a typo: not TOML
    for _ in range(2):      # the failed install left no stamp: the next start tries again
        r = install(c, e)
        assert r.returncode == 1 and r.stdout == ""
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"lguest-jit: installing {c} "), r.stderr
        log = base / "cache" / "install.log"
        assert lines[0].endswith(f"see {log}") and "TOMLDecodeError" in lines[0]     # pip's last word
        assert "Traceback" in log.read_text()        # the details are in the log, not on the terminal


def test_unknown_option_is_refused():
    r = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh"), "--frobnicate"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.startswith("usage:")
