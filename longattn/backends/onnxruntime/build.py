"""Build the ai.longattn custom-op library for onnxruntime:

    python -m longattn.backends.onnxruntime.build [--force] [--out DIR]

The PyPI onnxruntime wheel ships no C headers, so the repo vendors onnxruntime's C/C++ API headers
of version 1.21.0 (`csrc/onnxruntime-1.21.0/`, unmodified, from Debian's libonnxruntime-dev
1.21.0+dfsg-1; see the LICENSE there) and nothing else of onnxruntime. Set LONGATTN_ORT_HEADERS to a
folder holding onnxruntime_c_api.h & co. to build against other headers. The library asks for C
API version 21 and binds to the API of whichever onnxruntime (>= 1.21) loads it, so nothing links
against onnxruntime at build time. Compiled with the system C++ compiler (CXX, default
g++/c++) at -O3 -march=native, into a folder per CPU kind (`default_build_dir`). LONGATTN_ORT_CXXFLAGS
replaces those flags (`-O3 -march=x86-64-v3`: an AVX2 build); a library built with other flags is rebuilt.
`longattn.onnx.session` and `longattn convert --check` build it on first use (`ensure_library`); this
command builds it ahead of time.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

from . import LIBRARY_NAME, default_build_dir

ORT_HEADERS_VERSION = "1.21.0"
NEEDED_HEADERS = ("onnxruntime_c_api.h", "onnxruntime_cxx_api.h", "onnxruntime_cxx_inline.h",
                  "onnxruntime_float16.h", "onnxruntime_lite_custom_op.h")
SOURCES = ("register.cc",)
HERE = os.path.dirname(os.path.abspath(__file__))
VENDORED_HEADERS = os.path.join(HERE, "csrc", f"onnxruntime-{ORT_HEADERS_VERSION}")


class BuildError(Exception):
    pass


def headers_dir() -> str:
    folder = os.environ.get("LONGATTN_ORT_HEADERS") or VENDORED_HEADERS
    missing = [h for h in NEEDED_HEADERS if not os.path.exists(os.path.join(folder, h))]
    if missing:
        raise BuildError(f"{folder} lacks {', '.join(missing)} (LONGATTN_ORT_HEADERS or the vendored headers)")
    return folder


def compiler() -> str:
    for candidate in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if candidate and shutil.which(candidate):
            return candidate
    raise BuildError("no C++ compiler found (set CXX, or install g++: apt-get install g++)")


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _plan(out_dir: str | None, source_dir: str | None) -> tuple[str, str, list[str], list[str], str]:
    """(target, stamp key, sources, every file it depends on, the flags)."""
    target = os.path.join(out_dir or default_build_dir(), LIBRARY_NAME)
    csrc = source_dir or os.path.join(HERE, "csrc")
    sources = [os.path.join(csrc, s) for s in SOURCES]
    deps = sources + [os.path.join(csrc, h) for h in ("attention.h", "plan.h")]
    flags = os.environ.get("LONGATTN_ORT_CXXFLAGS", "-O3 -march=native").split()
    # the stamp beside the library records what built it: a library compiled with other flags (another
    # vector width), another compiler or other headers is stale even when newer than its sources
    key = json.dumps({"cxx": compiler(), "flags": flags, "headers": headers_dir(), "sources": csrc})
    return target, key, sources, deps, flags


def up_to_date(out_dir: str | None = None, source_dir: str | None = None) -> bool:
    """Is the library there, built from these sources with this compiler, these flags and headers?"""
    target, key, _, deps, _ = _plan(out_dir, source_dir)
    return os.path.exists(target) and _read(target + ".build") == key and \
        os.path.getmtime(target) >= max(os.path.getmtime(d) for d in deps)


def build(out_dir: str | None = None, force: bool = False, quiet: bool = False, source_dir: str | None = None) -> str:
    """Build (or reuse) the library; return its path. Raises BuildError with the reason. source_dir: another
    copy of csrc/ (the tests build deliberately broken copies to show that they catch the breakage)."""
    target, key, sources, _, flags = _plan(out_dir, source_dir)
    if not force and up_to_date(out_dir, source_dir):
        return target
    out_dir = os.path.dirname(target)
    os.makedirs(out_dir, exist_ok=True)
    stamp = target + ".build"
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".build-", suffix=".so")
    os.close(fd)
    cmd = [compiler(), "-std=c++17", "-shared", "-fPIC", *flags, "-I", headers_dir(), *sources, "-o", tmp,
           "-lpthread"]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise BuildError(f"compiling the custom-op library failed:\n$ {' '.join(cmd)}\n{result.stderr[-4000:]}")
        os.replace(tmp, target)
        with open(tmp, "w") as f:  # the same temporary name, for an atomic replace of the stamp
            f.write(key)
        os.replace(tmp, stamp)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if not quiet:
        print(f"built {target}")
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m longattn.backends.onnxruntime.build", description=__doc__)
    parser.add_argument("--out", help=f"output folder (default {default_build_dir()})")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    try:
        build(args.out, force=args.force)
    except BuildError as e:
        print(f"longattn: build failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
