"""lguest-jit: the lguest launcher in Python, hot paths compiled with Numba."""
__version__ = "0.1.0"
