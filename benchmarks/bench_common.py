"""Helpers shared by the benchmarks: fresh child processes, memory readings, result files.

The parent side imports no torch, so its own memory never leaks into a child's readings.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# The allocator settings memory benchmarks compare: minituner's own (`minituner finetune` on the
# CPU fixes glibc's mmap threshold at 1 MiB: minituner.util.files.pin_mmap_threshold, which the
# benchmarks' processes call too), glibc's growing threshold, and
# a 128 KiB fixed threshold (freed blocks go back to the system; RSS follows live tensors).
ALLOCATORS = {
    "minituner-1mib": {},
    "glibc-growing": {"MINITUNER_MMAP_THRESHOLD": "glibc"},
    "fixed-128kib": {"MALLOC_MMAP_THRESHOLD_": "131072"},
}

CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
             "TOKENIZERS_PARALLELISM": "false"}


def _status_field(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def vm_hwm_bytes() -> int:
    """Peak resident bytes of this process image so far (VmHWM; not inherited across exec)."""
    return _status_field("VmHWM")


def vm_rss_bytes() -> int:
    """Resident bytes of this process now (VmRSS)."""
    return _status_field("VmRSS")


def load_average() -> list:
    """The 1, 5 and 15 minute load averages."""
    return [round(v, 2) for v in os.getloadavg()]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or the platform's processor string)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_record() -> dict:
    """What the results depend on: CPU, core count, memory, Python and library versions."""
    from minituner.util.files import package_versions

    try:
        with open("/proc/meminfo") as handle:
            mem_total = int(handle.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        mem_total = None
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "mem_total_bytes": mem_total,
            "platform": platform.platform(), "versions": package_versions()}


def run_json_child(args: list, env: dict | None = None, timeout: float = 1800) -> dict:
    """Run ``python ARGS`` in a fresh process; return the JSON object on its last stdout line."""
    command = [sys.executable, *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, check=False,
                            timeout=timeout, env={**os.environ, **CHILD_ENV, **(env or {})})
    if result.returncode != 0:
        where, detail = f"child failed ({' '.join(command[1:])})", result.stderr.strip()
        if result.returncode == 1 and detail and "Traceback (most recent call last)" not in detail:
            # it stopped on purpose (SystemExit with a message, after any library noise)
            raise SystemExit(f"{where}: {detail.splitlines()[-1]}")
        raise SystemExit(f"{where}, exit {result.returncode}:\n{detail[-4000:]}")
    lines = [line for line in result.stdout.strip().splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"child printed no JSON ({' '.join(command[1:])}):\n"
                         f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return json.loads(lines[-1])


def write_results(path: Path, record: dict) -> None:
    """Write a result JSON atomically. Added where the record lacks them: ``command`` (the
    script and its arguments), ``load_average_after``; always: the machine record and a
    timestamp."""
    from minituner.util.files import atomic_write_json

    defaults = {"command": " ".join(["benchmarks/" + Path(sys.argv[0]).name, *sys.argv[1:]]),
                "load_average_after": load_average()}
    atomic_write_json(path, {**defaults, **record, "machine": machine_record(),
                             "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def median_spread(values: list, unit: str = "") -> dict:
    """Median, min and max of a list of numbers, and how many; ``unit`` suffixes the keys
    (``median_ms`` ...)."""
    suffix = f"_{unit}" if unit else ""
    ordered = sorted(values)
    n = len(ordered)
    median = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return {f"median{suffix}": median, f"min{suffix}": ordered[0], f"max{suffix}": ordered[-1],
            "n": n}


class RSSTimeline:
    """Resident memory sampled every ``interval`` seconds on a thread, with named marks: the
    peak of each stretch between two marks shows where a run's peak is (loading, a step)."""

    def __init__(self, interval: float = 0.002):
        import threading

        self.interval, self.samples, self.marks = interval, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), vm_rss_bytes()))
            self._stop.wait(self.interval)

    def start(self, first: str = "start") -> RSSTimeline:
        """Begin sampling; the first stretch is named ``first``."""
        self.mark(first)
        self._thread.start()
        return self

    def mark(self, name: str) -> None:
        """End the current stretch here; the next one is named ``name``."""
        self.marks.append((name, time.perf_counter()))

    def stop(self, baseline: int) -> list:
        """Stop sampling; [{"stretch", "peak_growth_bytes", "end_growth_bytes"}] per stretch,
        growth measured from ``baseline``."""
        self._stop.set()
        self._thread.join()
        ends = self.marks[1:] + [("end", time.perf_counter())]
        stretches = []
        for (name, begin), (_, end) in zip(self.marks, ends, strict=True):
            inside = [rss for at, rss in self.samples if begin <= at <= end]
            if inside:
                stretches.append({"stretch": name, "peak_growth_bytes": max(inside) - baseline,
                                  "end_growth_bytes": inside[-1] - baseline})
        return stretches

