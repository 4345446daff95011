"""The machine a figure was measured on: CPU model, widest vector ISA, cores, load. Every bench
prints it beside its figures (compiler options are chosen per CPU family from such figures)."""

from __future__ import annotations

import os
import platform


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def vector_isa() -> str:
    """The widest x86 vector ISA the CPU reports (what XLA:CPU and oneDNN generate code for)."""
    flags = cpu_flags()
    if "avx512f" in flags:
        return "AVX-512" + ("+BF16" if "avx512_bf16" in flags else "")
    if "avx2" in flags:
        return "AVX2" + ("+FMA" if "fma" in flags else "")
    return "SSE" if flags else "unknown ISA"


def describe() -> str:
    """e.g. ``AMD EPYC (AVX-512+BF16), 2 cores, load 3.1``."""
    cores = len(os.sched_getaffinity(0))
    return f"{cpu_name()} ({vector_isa()}), {cores} cores, load {os.getloadavg()[0]:.1f}"
