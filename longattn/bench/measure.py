"""Time and peak memory of one call, on the CPU or a CUDA device.

Timing: the caller makes a first call (the warm-up, which compiles where a compile is due), then
`time_calls` times up to `repeats` more and the median is reported. A call that takes long gets fewer
repeats: timing stops once `budget_s` seconds of timed calls are spent, after at least one. On CUDA each
call is bracketed by CUDA events and synchronised; on the CPU by `time.perf_counter`.

Peak memory is the growth during one call over what was in use before it: `torch.cuda.max_memory_allocated`
on CUDA; on Linux CPUs the process's resident set (VmHWM, its high-water mark reset through
/proc/self/clear_refs), elsewhere `ru_maxrss`, which cannot be reset and so only shows a peak above the
process's earlier ones. `memory_method(device)` says which, for the results file.
"""
from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Callable

import torch

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_call(fn: Callable, device: torch.device):
    """(result, seconds) of one call, synchronised: the warm-up, and on a compiled variant the compile."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def time_calls(fn: Callable, device: torch.device, repeats: int, budget_s: float):
    """(median ms, number of timed calls, the last call's result): up to `repeats` calls, stopping once
    `budget_s` seconds of them are spent (at least one call)."""
    times, result = [], None
    while len(times) < max(1, repeats) and (not times or sum(times) / 1e3 < budget_s):
        result = None  # the previous call's output is not kept alive through this one (peak memory)
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            start = time.perf_counter()
            result = fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), len(times), result


def _proc_kib(field: str) -> int:
    with open(_STATUS) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in {_STATUS}")


def _can_reset_rss_peak() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        _proc_kib("VmHWM")
        return True
    except OSError:
        return False


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda: torch.cuda.max_memory_allocated() during the call minus memory_allocated() before it"
    if _can_reset_rss_peak():
        return "cpu: process RSS high-water mark (VmHWM, reset through /proc/self/clear_refs) during the call " \
               "minus RSS before it"
    return "cpu: growth of ru_maxrss during the call (a lower bound: peaks below the process's earlier ones " \
           "do not show)"


class PeakMemory:
    """`with PeakMemory(device) as m: fn()`, then `m.mb`: the peak during the block above the memory in use
    before it, in MiB."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mb = None

    def __enter__(self):
        if self.device.type == "cuda":
            self._mode = "cuda"
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        elif _can_reset_rss_peak():  # the reset sets the high-water mark to the current RSS
            self._mode = "proc"
            self._before = _proc_kib("VmRSS") * 1024
        else:
            self._mode = "maxrss"
            self._before = _maxrss()
        return self

    def __exit__(self, *exc):
        if self._mode == "cuda":
            synchronize(self.device)
            after = torch.cuda.max_memory_allocated(self.device)
        elif self._mode == "proc":
            after = _proc_kib("VmHWM") * 1024
        else:
            after = _maxrss()
        self.mb = round(max(0, after - self._before) / 2**20, 1)
        return False


def _maxrss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure (a RuntimeError naming it), also where dynamo
    wrapped it (an out-of-memory during a compile reaches the caller as the cause of a dynamo error)."""
    while error is not None:
        if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
            return True
        text = str(error).lower()
        if isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text):
            return True
        error = error.__cause__
    return False
