"""Compile every Triton (and Gluon) kernel of `longattn/kernels/` offline for an H100 (sm_90), at every config
its launcher can pick, and check what the GPU would refuse.

Why: the CPU test suite runs the kernels in Triton's interpreter, which neither type-checks them the way the
compiler does nor knows about shared memory or registers. A kernel that compiled under one Triton failed under
the GPU image's older one, and a decode config needed more shared memory than an H100 has; both shipped. Triton
ships ptxas and cuobjdump, so compiling for sm_90 needs no GPU; CI runs this under the oldest and the newest
Triton that pyproject.toml allows.

What is checked (`case_failure`, `group_failure`):
- every compile succeeds;
- a config the launcher relies on (a pinned launch, or an autotuning config at the shapes it is tuned for) fits:
  at most SHARED_MEMORY_LIMIT bytes of shared memory, and no more register spill than its kernel file's
  SPILL_LIMITS allow;
- where the launcher tries configs in order until one fits (a fallback chain), one of them fits at every gate
  shape; where it hands over to another kernel when none fits, that kernel's chain fits instead.

The cases come from `gate_flash`, `gate_hyper` and `gate_linear`, which read the config lists from the kernel
modules themselves, so that editing a kernel's list is what the gate checks. Each distinct (kernel, signature,
constexprs, options) compiles once, in a pool of WORKERS processes.

`report_in_fresh_process` runs the compiles in a process without TRITON_INTERPRET (the test suite's conftest
sets it; under it @triton.jit builds interpreter objects the compiler cannot take).
`python -m tests.kernels.compile_gate` prints every case with its shared memory, spill and verdict.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

SHARED_MEMORY_LIMIT = 232448  # bytes of shared memory one block may opt in to on an H100 or H200 (227 KiB)
TARGET = ("cuda", 90, 32)  # sm_90, 32 threads a warp
# compiling processes: one a core (CI has two), at most 8 (a compile of the widest tiles takes a few GB)
WORKERS = max(2, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2))
ALIGN = 16  # the divisibility the JIT sees for 16-byte aligned pointers and for integers that are multiples of 16
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def nvidia_tools() -> str | None:
    """The folder of the ptxas and cuobjdump that the installed triton wheel ships, or None without them."""
    try:
        import triton
    except ImportError:
        return None
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return tools if all(os.path.exists(os.path.join(tools, t)) for t in ("ptxas", "cuobjdump")) else None


@dataclass
class Launch:
    """One compile: `module.kernel` with these argument types, constexprs and compile options.

    types: the type of each argument that is neither a constexpr nor an i32 ("*bf16", "fp32", "tensordesc<...>").
    Integer arguments count as multiples of 16 and pointers as 16-byte aligned (as the JIT specialises real
    shapes), except where the kernel says do_not_specialize: that is where the compiler vectorises and
    pipelines the most, so where shared memory peaks."""
    module: str
    kernel: str
    types: dict
    constexprs: dict
    options: dict
    gluon: bool = False

    def key(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)


@dataclass
class Case:
    """A launch and what the launcher needs of it. Its test id names kernel, shape and config."""
    file: str  # the kernel's file, relative to longattn/kernels/
    shape: str
    config: str
    launch: Launch
    must_fit: bool  # the launcher relies on this config at this shape (pinned, or tuned for it)
    spill_limit: int | None = None  # bytes of register spill allowed (the kernel file's SPILL_LIMITS); None: any
    needs_mma: bool = False  # the kernel's products must run on the tensor cores
    group: str | None = None  # the fallback chain it belongs to, if any

    @property
    def id(self) -> str:
        return f"{self.file}:{self.launch.kernel}:{self.shape}:{self.config}"


@dataclass
class Group:
    """Configs a launcher tries in order at one shape, launching the first that fits (a fallback chain). With
    `handover`, a launcher that finds none hands the call to another kernel (the named group) instead."""
    name: str
    members: list = field(default_factory=list)  # case ids, in the launcher's order
    handover: str | None = None


def make_case(module, kernel: str, shape: str, config: str, *, types: dict, constexprs: dict, options: dict,
              must_fit: bool, half_precision: bool, group: Group | None = None, needs_mma: bool = False,
              gluon: bool = False) -> Case:
    """A case for `module.kernel`; added to `group` when given. Its spill bound is the one its file declares, in
    half-precision runs only: their tiles are the ones measured and tuned, while fp32 runs are a correctness path
    whose wide tiles spill by design (reported, not bounded)."""
    launch = Launch(module.__name__, kernel, types, constexprs, options, gluon)
    file = os.path.relpath(module.__file__, os.path.join(ROOT, "longattn", "kernels"))
    limit = spill_limit(module, kernel, {**constexprs, **options}) if half_precision else None
    case = Case(file, shape, config, launch, must_fit, limit, needs_mma, None if group is None else group.name)
    if group is not None:
        group.members.append(case.id)
    return case


def options_label(options: dict) -> str:
    short = {"num_warps": "w", "num_stages": "s"}
    return " ".join(f"{short.get(k, k + '=')}{v}" for k, v in options.items())


def config_label(prefix: str, tiles: dict, options: dict) -> str:
    """A readable config name for test ids: `tuned[2] BLOCK_M=128 BLOCK_N=64 w4 s3`."""
    return " ".join([prefix, *(f"{k}={v}" for k, v in tiles.items()), options_label(options)]).strip()


def spill_limit(module, kernel: str, launch_settings: dict) -> int | None:
    """The bound on register spill (bytes) that the kernel's file declares for this launch, or None (no bound).

    `SPILL_LIMITS` in the kernel's module maps entries to bytes (None: unbounded). An entry is a kernel name, or
    "*" for every kernel of the file, optionally followed by conditions on the launch's constexprs and compile
    options ("_decode_kernel FMAP=3", "* BLOCK_M=128 num_warps=4"). Of the entries that match, one naming the
    kernel beats "*", then the one with more conditions wins."""
    best, rank = None, None
    for entry, limit in getattr(module, "SPILL_LIMITS", {}).items():
        name, *conditions = entry.split()
        pairs = [c.split("=", 1) for c in conditions]
        if name not in (kernel, "*") or any(str(launch_settings.get(k)) != v for k, v in pairs):
            continue
        if rank is None or (name == kernel, len(pairs)) > rank:
            best, rank = limit, (name == kernel, len(pairs))
    return best


# ---- compiling (in the pool's processes) ----------------------------------------------------------------------

def _signature(kernel, launch: Launch):
    missing = [n for n in [*launch.constexprs, *launch.types] if n not in kernel.arg_names]
    if missing:
        raise TypeError(f"the gate names arguments the kernel does not have: {missing}")
    sig, attrs = {}, {}
    for i, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        if name in launch.constexprs:
            sig[name] = "constexpr"
            continue
        sig[name] = launch.types.get(name, "i32")
        if (sig[name] == "i32" or sig[name].startswith("*")) and not param.do_not_specialize:
            attrs[(i,)] = [["tt.divisibility", ALIGN]]
    return sig, attrs


def _resource_usage(cubin: bytes) -> dict:
    """Registers per thread and stack bytes (register spill) from cuobjdump's resource usage."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        report = subprocess.run([os.path.join(nvidia_tools(), "cuobjdump"), "--dump-resource-usage", path],
                                capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK):(\d+)", report))
    return {"regs": int(usage.get("REG", 0)), "spill": int(usage.get("STACK", 0))}


def _error_text(e: Exception) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= 2000 else text[:1600] + "\n[...]\n" + text[-400:]


def compile_launch(launch: Launch) -> dict:
    """Compile one launch for sm_90: {"shared", "regs", "spill", "mma", "seconds"} or {"error", "seconds"}."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    start = time.monotonic()
    try:
        kernel = getattr(importlib.import_module(launch.module), launch.kernel)
        sig, attrs = _signature(kernel, launch)
        constexprs = {(kernel.arg_names.index(n),): v for n, v in launch.constexprs.items()}
        if launch.gluon:
            from triton.experimental.gluon._runtime import GluonASTSource as Source
        else:
            from triton.compiler import ASTSource as Source
        compiled = triton.compile(Source(kernel, sig, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget(*TARGET), options=dict(launch.options))
        result = {"shared": int(compiled.metadata.shared), "mma": "mma" in compiled.asm["ptx"],
                  **_resource_usage(compiled.asm["cubin"])}
    except Exception as e:  # noqa: BLE001 - any compile failure is a finding, reported per case
        result = {"error": _error_text(e)}
    result["seconds"] = round(time.monotonic() - start, 2)
    return result


# ---- the cases and their verdicts -----------------------------------------------------------------------------

def collect() -> tuple[list, list]:
    """Every case and fallback group of the flash, hyper and linear kernels."""
    from . import gate_flash, gate_hyper, gate_linear
    cases, groups = [], []
    for family in (gate_flash, gate_hyper, gate_linear):
        c, g = family.cases()
        cases += c
        groups += g
    ids = [c.id for c in cases]
    duplicates = {i for i in ids if ids.count(i) > 1}
    assert not duplicates, f"case ids must be unique: {sorted(duplicates)}"
    return cases, groups


def list_ids() -> dict:
    """The test ids, for pytest's collection."""
    cases, groups = collect()
    return {"cases": [c.id for c in cases], "groups": [g.name for g in groups]}


def _fits(result: dict) -> bool:
    return "error" not in result and result["shared"] <= SHARED_MEMORY_LIMIT


def _describe(case: Case, result: dict, brief: bool = False) -> str:
    """What a case needs, or its compile error (brief: the error's last line, where the cause is)."""
    where = f"longattn/kernels/{case.file} {case.launch.kernel}, config [{case.config}], shape {case.shape}"
    if "error" in result:
        lines = [line for line in result["error"].splitlines() if line.strip()]
        return f"{where}: does not compile: {lines[-1].strip() if brief else result['error']}"
    return (f"{where}: {result['shared']} bytes of shared memory (limit {SHARED_MEMORY_LIMIT}), "
            f"{result['spill']} bytes of register spill, {result['regs']} registers")


def case_failure(case: Case, result: dict) -> str | None:
    """Why this case fails, or None. A config that does not fit fails only where the launcher relies on it: in a
    fallback chain the launcher moves on to the next config, which `group_failure` checks."""
    if "error" in result:
        return _describe(case, result)
    if case.needs_mma and not result["mma"]:
        return _describe(case, result) + ": no tensor-core (mma) instructions"
    if case.must_fit and result["shared"] > SHARED_MEMORY_LIMIT:
        return _describe(case, result) + f": {result['shared'] - SHARED_MEMORY_LIMIT} bytes over the limit"
    if _fits(result) and case.spill_limit is not None and result["spill"] > case.spill_limit:
        return _describe(case, result) + f": spills {result['spill']} bytes, the file allows {case.spill_limit}"
    return None


def group_failure(group: Group, cases: dict, results: dict, groups: dict) -> str | None:
    """None if the first config of the chain that fits exists (or the handover's chain has one), else why not."""
    for member in group.members:
        if _fits(results[member]):
            return None
    if group.handover is not None:
        other = group_failure(groups[group.handover], cases, results, groups)
        return None if other is None else f"{group.name}: nothing fits and the handover fails: {other}"
    lines = [f"{group.name}: no config of the chain fits, so the launcher has nothing to launch:"]
    lines += [f"  {_describe(cases[m], results[m], brief=True)}" for m in group.members]
    return "\n".join(lines)


def first_fit(group: Group, results: dict) -> str | None:
    return next((m for m in group.members if _fits(results[m])), None)


def run_gate() -> dict:
    """Compile every distinct launch in a pool, then judge every case and group. JSON-able."""
    import multiprocessing

    import triton
    cases, groups = collect()
    launches = {}
    for c in cases:
        launches.setdefault(c.launch.key(), c.launch)
    start = time.monotonic()
    with multiprocessing.get_context("spawn").Pool(WORKERS) as pool:
        compiled = dict(zip(launches, pool.map(compile_launch, launches.values(), chunksize=1)))
    seconds = time.monotonic() - start
    by_id = {c.id: c for c in cases}
    results = {c.id: compiled[c.launch.key()] for c in cases}
    by_name = {g.name: g for g in groups}
    return {
        "triton": triton.__version__, "seconds": round(seconds, 1), "compiles": len(launches),
        "compile_seconds": round(sum(r["seconds"] for r in compiled.values()), 1),
        "cases": {c.id: {**results[c.id], "must_fit": c.must_fit, "group": c.group,
                         "failure": case_failure(c, results[c.id])} for c in cases},
        "groups": {g.name: {"first_fit": first_fit(g, results), "handover": g.handover,
                            "failure": group_failure(g, by_id, results, by_name)} for g in groups},
    }


def report_in_fresh_process(module: str, function: str, timeout: int = 1800) -> dict:
    """`module.function()` (a JSON-able dict) run in a fresh process without TRITON_INTERPRET, so that its
    kernels are real JIT functions that the compiler takes."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"import json, {module} as t; print(json.dumps(t.{function}()))"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    """Print each case's resources and verdict, and each chain's first fit; exit 1 on any failure."""
    report = run_gate()
    bad = 0
    for cid, r in report["cases"].items():
        state = "FAIL" if r["failure"] else "ok"
        bad += bool(r["failure"])
        use = r.get("error", "").splitlines()[0][:100] if "error" in r else \
            f"shared={r['shared']:>6} spill={r['spill']:>4} regs={r['regs']:>3}"
        print(f"{state:4} {use:42} {r['seconds']:6.1f}s  {cid}")
    for name, g in report["groups"].items():
        bad += bool(g["failure"])
        print(f"{'FAIL' if g['failure'] else 'ok':4} chain {name}: first fit {g['first_fit']}")
    for r in [*report["cases"].values(), *report["groups"].values()]:
        if r["failure"]:
            print("\n" + r["failure"])
    print(f"\ntriton {report['triton']}: {report['compiles']} compiles for {len(report['cases'])} cases in "
          f"{report['seconds']} s with {WORKERS} processes ({report['compile_seconds']} s of compiling)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
