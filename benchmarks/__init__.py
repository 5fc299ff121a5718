"""Benchmarks run by `lguest-jit bench <what>`; each compares Numba, pure Python and a physical reference in one run."""
