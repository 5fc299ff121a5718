"""Fuzz targets (see fuzz/common.py and scripts/fuzz.sh).  The targets check
against the plain references in tests/ (naive.py, test_decode's capstone
oracle), so that folder goes on sys.path with the package."""
import os as _os
import sys as _sys

_tests = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "tests")
if _tests not in _sys.path:
    _sys.path.append(_tests)
