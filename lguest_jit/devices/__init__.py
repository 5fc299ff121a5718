"""The lguest devices: console, block, network and rng, each virtqueue served
by its own thread running nogil kernels.  See base.py for the lifecycle."""
from .base import Device, error_message  # noqa: F401
from .block import Block  # noqa: F401
from .console import Console, raw_terminal  # noqa: F401
from .net import Net, TunSpec, parse_tunnet  # noqa: F401
from .rng import Rng  # noqa: F401
