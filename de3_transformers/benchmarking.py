"""Helpers shared by the benchmark scripts under `benchmarks/`."""

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo on Linux), else what `platform` knows."""
    fallback = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return fallback
    names = (line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name"))
    return next(names, fallback)


__all__ = ["cpu_name"]
