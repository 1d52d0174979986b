"""The fingerprint of longattn's kernel sources, which a GPU check records and CI compares with the tree it tests.

A GPU check (`gpu_check.sh`) only vouches for the kernels it ran. Its record keeps `kernel_hash(root)` of the
tree it checked, and `gpu_check_status.py` recomputes it on the current tree to tell whether the kernels changed
since, without needing git or the checked commit. Defined once here so that both always hash the same way.

The hash covers the files under longattn/kernels/ ending in .py, .h or .cc (not __pycache__, not notes): for
each, in sorted order of its path relative to the repository root (with "/" separators), the line
"<path>\\0<sha256 of its bytes>\\n" goes into one sha256. Hashing each file's digest rather than its raw bytes
keeps the encoding unambiguous, and `kernel_file_hashes` gives the same per-file digests, so that a record can
also say which files differ where git cannot.
"""
from __future__ import annotations

import hashlib
import os

KERNEL_DIR = "longattn/kernels"
SUFFIXES = (".py", ".h", ".cc")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kernel_file_hashes(root: str = REPO_ROOT) -> dict[str, str]:
    """{path relative to root: sha256 hex of its bytes} for the hashed kernel sources, sorted by path."""
    base = os.path.join(root, KERNEL_DIR)
    if not os.path.isdir(base):
        raise FileNotFoundError(f"kernel_hash: no {KERNEL_DIR}/ under {root!r}: not a longattn checkout")
    digests = {}
    for folder, dirs, files in os.walk(base):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith(SUFFIXES):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                with open(path, "rb") as f:
                    digests[rel] = hashlib.sha256(f.read()).hexdigest()
    return dict(sorted(digests.items()))


def hash_of(file_hashes: dict[str, str]) -> str:
    """The kernel hash of a {path: sha256} mapping (as `kernel_file_hashes` returns)."""
    h = hashlib.sha256()
    for rel, digest in sorted(file_hashes.items()):
        h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest()


def kernel_hash(root: str = REPO_ROOT) -> str:
    """sha256 hex of the kernel sources under root (see the module docstring)."""
    return hash_of(kernel_file_hashes(root))


if __name__ == "__main__":
    print(kernel_hash())
