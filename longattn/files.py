"""Atomic output files: a temporary file beside the target, renamed onto it only once complete,
so a reader never sees a half-written file and a failure leaves the old one (if any) in place."""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path in `path`'s folder; write the file there. On leaving the block it is
    renamed onto `path`; if the block raises, it is removed and `path` is untouched."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".longattn-", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
