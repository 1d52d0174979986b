"""Build the ai.longattn custom-op library for onnxruntime:

    python -m longattn.backends.onnxruntime.build [--force] [--out DIR]

The PyPI onnxruntime wheel ships no C headers, so the build fetches them from one pinned
package: Debian's libonnxruntime-dev 1.21.0+dfsg-1 (about 85 KB, checked against its SHA-256),
from the machine's Debian mirror or snapshot.debian.org, and unpacks only its headers (pure
Python: a .deb is an ar archive holding data.tar.xz). Set LONGATTN_ORT_HEADERS to a folder
holding onnxruntime_c_api.h & co. to use other headers (no download). The library is built
against C API version 21 and binds to the API of whichever onnxruntime (>= 1.21) loads it, so
nothing links against onnxruntime at build time. Compiled with the system C++ compiler
(CXX, default g++/c++) at -O3 -march=native: build it on the machine that runs it.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request

from . import LIBRARY_NAME, default_build_dir

ORT_HEADERS_VERSION = "1.21.0"
DEB_NAME = "libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb"
DEB_POOL_PATH = "pool/main/o/onnxruntime/" + DEB_NAME
DEB_SHA256 = "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08"
SNAPSHOT = "https://snapshot.debian.org/archive/debian/20250315T000000Z"
NEEDED_HEADERS = ("onnxruntime_c_api.h", "onnxruntime_cxx_api.h", "onnxruntime_cxx_inline.h",
                  "onnxruntime_float16.h", "onnxruntime_lite_custom_op.h")
SOURCES = ("register.cc",)
HERE = os.path.dirname(os.path.abspath(__file__))


class BuildError(Exception):
    pass


def _mirrors() -> list[str]:
    mirrors = []
    if os.environ.get("LONGATTN_DEBIAN_MIRROR"):
        mirrors.append(os.environ["LONGATTN_DEBIAN_MIRROR"].rstrip("/"))
    try:  # the machine's own Debian mirror (deb822 sources)
        with open("/etc/apt/sources.list.d/debian.sources") as f:
            for line in f:
                if line.startswith("URIs:"):
                    mirrors.extend(u.rstrip("/") for u in line.split()[1:] if "security" not in u)
    except OSError:
        pass
    mirrors += ["http://deb.debian.org/debian", SNAPSHOT]
    return list(dict.fromkeys(mirrors))


def _deb_member(data: bytes, prefix: str) -> tuple[str, bytes]:
    """The member of an ar archive whose name starts with `prefix`."""
    if not data.startswith(b"!<arch>\n"):
        raise BuildError("downloaded file is not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = data[pos + 60:pos + 60 + size]
        if name.startswith(prefix):
            return name, body
        pos += 60 + size + (size & 1)
    raise BuildError(f"no {prefix}* in the Debian package")


def fetch_headers(dest: str) -> str:
    """Download the pinned package, check it, unpack the headers into dest; return the folder."""
    errors = []
    for mirror in _mirrors():
        url = f"{mirror}/{DEB_POOL_PATH}"
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                data = r.read()
        except Exception as e:
            errors.append(f"{url}: {e}")
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest != DEB_SHA256:
            errors.append(f"{url}: SHA-256 {digest} is not the pinned {DEB_SHA256}")
            continue
        name, payload = _deb_member(data, "data.tar")
        tmp = tempfile.mkdtemp(dir=os.path.dirname(dest) or ".", prefix=".headers-")
        try:
            with tarfile.open(fileobj=io.BytesIO(payload), mode="r:*") as tar:
                for member in tar.getmembers():
                    base = os.path.basename(member.name)
                    if member.isfile() and "/include/onnxruntime/" in member.name and base.endswith(".h") \
                            and "/core/" not in member.name:
                        with tar.extractfile(member) as src, open(os.path.join(tmp, base), "wb") as out:
                            out.write(src.read())
            missing = [h for h in NEEDED_HEADERS if not os.path.exists(os.path.join(tmp, h))]
            if missing:
                raise BuildError(f"{url}: package lacks {', '.join(missing)}")
            if os.path.exists(dest):
                shutil.rmtree(dest)
            os.replace(tmp, dest)
            return dest
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    raise BuildError("could not fetch the onnxruntime C API headers (pinned: Debian libonnxruntime-dev "
                     f"{ORT_HEADERS_VERSION}+dfsg-1):\n  " + "\n  ".join(errors) +
                     "\nSet LONGATTN_DEBIAN_MIRROR to a reachable Debian mirror, or LONGATTN_ORT_HEADERS to a "
                     "folder with the onnxruntime >= 1.21 headers.")


def headers_dir(build_dir: str) -> str:
    explicit = os.environ.get("LONGATTN_ORT_HEADERS")
    if explicit:
        missing = [h for h in NEEDED_HEADERS if not os.path.exists(os.path.join(explicit, h))]
        if missing:
            raise BuildError(f"LONGATTN_ORT_HEADERS={explicit} lacks {', '.join(missing)}")
        return explicit
    dest = os.path.join(build_dir, f"onnxruntime-headers-{ORT_HEADERS_VERSION}")
    if all(os.path.exists(os.path.join(dest, h)) for h in NEEDED_HEADERS):
        return dest
    return fetch_headers(dest)


def compiler() -> str:
    for candidate in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if candidate and shutil.which(candidate):
            return candidate
    raise BuildError("no C++ compiler found (set CXX, or install g++: apt-get install g++)")


def build(out_dir: str | None = None, force: bool = False, quiet: bool = False) -> str:
    """Build (or reuse) the library; return its path. Raises BuildError with the reason."""
    out_dir = out_dir or default_build_dir()
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, LIBRARY_NAME)
    sources = [os.path.join(HERE, "csrc", s) for s in SOURCES]
    deps = sources + [os.path.join(HERE, "csrc", h) for h in ("attention.h", "plan.h")]
    if not force and os.path.exists(target) and \
            os.path.getmtime(target) >= max(os.path.getmtime(d) for d in deps):
        return target
    include = headers_dir(out_dir)
    flags = os.environ.get("LONGATTN_ORT_CXXFLAGS", "-O3 -march=native").split()
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".build-", suffix=".so")
    os.close(fd)
    cmd = [compiler(), "-std=c++17", "-shared", "-fPIC", *flags, "-I", include, *sources, "-o", tmp, "-lpthread"]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise BuildError(f"compiling the custom-op library failed:\n$ {' '.join(cmd)}\n{result.stderr[-4000:]}")
        os.replace(tmp, target)
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
