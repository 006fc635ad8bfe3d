"""Wall time and peak resident memory of this process and every process it starts."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil


def tree_rss(root: psutil.Process, skip: int | None = None) -> int:
    """Resident bytes of a process and all its descendants (processes may end meanwhile)."""
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        if proc.pid == skip:
            continue
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def _sample_until_stdin_closes(pid: int, interval: float) -> None:
    """The sampler process: the peak of the tree under `pid` (itself excluded), printed when
    the measured block ends (its stdin closes)."""
    root, me, peak = psutil.Process(pid), os.getpid(), 0
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    while True:
        peak = max(peak, tree_rss(root, skip=me))
        if done.wait(interval):
            break
    print(max(peak, tree_rss(root, skip=me)), flush=True)


class PeakMemory:
    """Peak RSS of this process tree while the block runs. Sampled from a separate process:
    walking every process of the machine from a thread here would take the GIL from the work
    being measured."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak = interval, 0

    def __enter__(self) -> PeakMemory:
        code = ("import sys; from bench.probe import _sample_until_stdin_closes as sample;"
                " sample(int(sys.argv[1]), float(sys.argv[2]))")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code, str(os.getpid()), str(self.interval)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1],
        )
        return self

    def __exit__(self, *exc) -> None:
        out, _ = self._proc.communicate("", timeout=60)
        self.peak = int(out.strip() or 0)


@dataclass
class Repetition:
    seconds: float
    peak_rss_bytes: int
    detail: dict[str, Any] = field(default_factory=dict)


def measure(fn: Callable[[], dict[str, Any] | None]) -> Repetition:
    """Run fn once; its return value (a dict) is kept as the repetition's detail."""
    with PeakMemory() as mem:
        started = time.perf_counter()
        detail = fn() or {}
        seconds = time.perf_counter() - started
    return Repetition(seconds=seconds, peak_rss_bytes=mem.peak, detail=detail)


def summary(reps: list[Repetition], rows: int) -> dict[str, Any]:
    """Median and min-max of the wall times, peak memory, source rows per second."""
    times = [r.seconds for r in reps]
    median = statistics.median(times)
    return {
        "repetitions": len(reps),
        "seconds": [round(t, 3) for t in times],
        "median_s": round(median, 3),
        "min_s": round(min(times), 3),
        "max_s": round(max(times), 3),
        "peak_rss_bytes": max(r.peak_rss_bytes for r in reps),
        "rows": rows,
        "rows_per_s": round(rows / median) if median > 0 else None,
    }
