"""Which Triton builds the kernels: launch settings measured on one version can spill registers on another."""
from __future__ import annotations


def triton_older_than(major: int, minor: int) -> bool:
    """True when the installed Triton is older than major.minor (False without Triton)."""
    try:
        import triton
    except ImportError:
        return False
    return tuple(int(x) for x in triton.__version__.split(".")[:2]) < (major, minor)
