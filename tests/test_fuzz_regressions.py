"""The fuzz targets (fuzz/) as tests: every committed corpus input of every
target passes its checks (kernels against tests/naive.py, the shadow disk,
capstone, the decode reference).  Inputs the campaign found that broke a
check are committed to fuzz/corpus/<target>/ under a name starting with
``regress-`` and so are replayed here too.  scripts/fuzz.sh does the long
runs and the pure-Python vs Numba comparison."""
import importlib
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")
TARGETS = sorted(os.listdir(CORPUS))
CASES = [(t, f) for t in TARGETS for f in sorted(os.listdir(os.path.join(CORPUS, t)))]


def test_every_target_has_a_seed_corpus():
    mods = {f[len("fuzz_"):-3] for f in os.listdir(os.path.join(ROOT, "fuzz")) if f.startswith("fuzz_")}
    assert mods == set(TARGETS) and all(os.listdir(os.path.join(CORPUS, t)) for t in TARGETS)
    total = sum(os.path.getsize(os.path.join(CORPUS, t, f)) for t, f in CASES)
    assert total < 2 << 20


@pytest.mark.parametrize("target,name", CASES, ids=[f"{t}/{f}" for t, f in CASES])
def test_corpus_input_passes_its_checks(target, name):
    mod = importlib.import_module(f"fuzz.fuzz_{target}")
    with open(os.path.join(CORPUS, target, name), "rb") as f:
        data = f.read()
    assert len(mod.one_input(data)) == 16          # a digest: the run completed and every check held


def test_a_wrong_kernel_result_is_caught(monkeypatch):
    """The blk target's shadow disk notices a request kernel that answers
    wrongly (here: reads return the sector after the one asked for)."""
    from fuzz import fuzz_blk
    from fuzz.ring import PAYLOAD
    from lguest_jit.devices import block
    real = block._blk_request

    def off_by_one(mem, q, iov, hiov, hdr, segs, fd, limits, ident):
        if mem[PAYLOAD] == block.T_IN:
            mem[PAYLOAD + 8] += 1          # the sector number in the request header
        return real(mem, q, iov, hiov, hdr, segs, fd, limits, ident)
    monkeypatch.setattr(fuzz_blk.blk, "_blk_request", off_by_one)
    with open(os.path.join(CORPUS, "blk", "seed-read"), "rb") as f:
        with pytest.raises(AssertionError):
            fuzz_blk.one_input(f.read())
