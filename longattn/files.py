"""Atomic output files: a temporary file beside the target, renamed onto it only once complete,
so a reader never sees a half-written file and a failure leaves the old one (if any) in place."""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator


def _process_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: put it back at once
    os.umask(mask)
    return mask


UMASK = _process_umask()


def give_normal_mode(path: str) -> None:
    """The permissions any other tool's new file gets (0666 less the umask): temporary files are created 0600,
    and a finished output must not stay private to its writer."""
    os.chmod(path, 0o666 & ~UMASK)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path in `path`'s folder; write the file there. On leaving the block it is
    renamed onto `path`; if the block raises, it is removed and `path` is untouched."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".longattn-", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        give_normal_mode(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
