"""What the host, or the container around this process, lets it use: memory, open files, cores.

A container (Docker, Kubernetes, Slurm's cgroups, a Colab runtime) caps a process's memory with a
cgroup limit that ``/proc/meminfo`` does not show: it lists the whole host's memory, while going
over the limit gets the process killed by the kernel (SIGKILL: no Python error, no message, the
work since the last checkpoint lost). Batch systems and macOS often start a process with a soft
limit of 256 or 1,024 open files (``ulimit -n``), below what reading a dataset of many files
keeps open.
"""

from __future__ import annotations

import os

try:
    import resource
except ImportError:  # Windows
    resource = None

# cgroup v1 writes "no limit" as a huge number (9223372036854771712 on 4 KiB pages).
UNLIMITED = 1 << 60
# Per cgroup version: the limit files, the usage file and memory.stat's reclaimable page cache.
_V2_FILES = ("memory.max", "memory.high", "memory.current", "inactive_file")
_V1_FILES = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


def _read_int(path: str) -> int | None:
    """The file's number; None for a missing or unreadable file or "max" (cgroup v2's none)."""
    try:
        with open(path) as f:
            text = f.read().split()
    except OSError:
        return None
    if not text or not text[0].isdigit():
        return None
    value = int(text[0])
    return value if value < UNLIMITED else None


def _stat(path: str, key: str) -> int:
    """``key``'s number in a ``memory.stat`` file (0 if absent)."""
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _meminfo_available(proc: str) -> int | None:
    try:
        with open(os.path.join(proc, "meminfo")) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _address_space_room(proc: str) -> int | None:
    """What is left of the soft address-space limit (``ulimit -v``; Grid Engine's ``h_vmem``,
    some Slurm setups) beyond the process's virtual size, or None without such a limit. Past it
    an allocation fails: a 527 MB decoded copy under ``ulimit -v 3500000`` crashed the process
    with a segmentation fault in the record reader's C++."""
    if resource is None:
        return None
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit == resource.RLIM_INFINITY or limit >= UNLIMITED:
        return None
    try:
        with open(os.path.join(proc, "self", "status")) as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return max(limit - int(line.split()[1]) * 1024, 0)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_dirs(proc: str, cgroup_root: str, controller: str = "memory") -> list[tuple[str, int]]:
    """The ``controller`` cgroup directories of this process and of each cgroup above it, with
    their version: a limit may be set on any of them (a Kubernetes pod's and its container's)."""
    try:
        with open(os.path.join(proc, "self", "cgroup")) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            mount, version = cgroup_root, 2
        elif controller in controllers.split(","):
            mount, version = os.path.join(cgroup_root, controller), 1
        else:
            continue
        parts = [p for p in path.split("/") if p]
        # Inside a container without its own cgroup namespace the path is the host's
        # (/docker/<id>) while the mount shows the container's own cgroup: the deepest directory
        # that exists is where to start.
        while parts and not os.path.isdir(os.path.join(mount, *parts)):
            parts.pop(0)
        for depth in range(len(parts), -1, -1):
            found.append((os.path.join(mount, *parts[:depth]), version))
    return found


def memory_room_bytes(proc: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> int | None:
    """Bytes this process may still allocate: the smallest of the host's available memory
    (``MemAvailable``), what its address-space limit leaves and, for its memory cgroup and every
    one above it that has a limit, the limit less what the cgroup uses (its reclaimable page
    cache, ``inactive_file``, counted as free). None where none of these can be read."""
    rooms = []
    if (available := _meminfo_available(proc)) is not None:
        rooms.append(available)
    if (address_room := _address_space_room(proc)) is not None:
        rooms.append(address_room)
    for directory, version in _cgroup_dirs(proc, cgroup_root):
        names = _V2_FILES if version == 2 else _V1_FILES
        *limit_files, usage_file, inactive_key = names
        limits = [_read_int(os.path.join(directory, name)) for name in limit_files]
        usage = _read_int(os.path.join(directory, usage_file))
        inactive = _stat(os.path.join(directory, "memory.stat"), inactive_key)
        limits = [limit for limit in limits if limit is not None]
        if limits and usage is not None:
            rooms.append(max(min(limits) - max(usage - inactive, 0), 0))
    return min(rooms) if rooms else None


def open_files() -> int:
    """How many files this process has open (0 where that cannot be listed: macOS)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def open_file_limit(wanted: int) -> tuple[int, int] | None:
    """This process's (soft, hard) limit on open files, the soft one first raised towards
    ``wanted`` as far as the hard one allows (an unprivileged process may); None where there is
    no such limit (Windows). An unlimited value is returned as ``UNLIMITED``."""
    if resource is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    infinite = resource.RLIM_INFINITY
    if soft != infinite and soft < wanted:
        target = wanted if hard == infinite else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return (UNLIMITED if soft == infinite else soft), (UNLIMITED if hard == infinite else hard)


def usable_cpus(proc: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> int:
    """Cores this process can keep busy: those it may run on (``sched_getaffinity``; where
    there is none, macOS, ``os.cpu_count``), fewer under a cgroup CPU quota (Docker's ``--cpus``,
    Kubernetes' ``limits.cpu``: ``cpu.max``, or ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``)
    rounded up; at least 1. Inside a container both others count the host's cores."""
    affinity = getattr(os, "sched_getaffinity", None)  # Linux
    cpus = len(affinity(0)) if affinity else os.cpu_count() or 1
    for directory, version in _cgroup_dirs(proc, cgroup_root, "cpu"):
        quota = period = None
        if version == 2:
            try:
                with open(os.path.join(directory, "cpu.max")) as f:
                    quota, period = (_number(text) for text in f.read().split()[:2])
            except (OSError, ValueError):
                pass
        else:
            quota = _number(_read_text(os.path.join(directory, "cpu.cfs_quota_us")))
            period = _number(_read_text(os.path.join(directory, "cpu.cfs_period_us")))
        if quota and period and quota > 0:
            cpus = min(cpus, -(-quota // period))
    return max(cpus, 1)


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _number(text: str) -> int | None:
    """An integer, or None for "max" (cgroup v2's none), -1 (v1's none) or nothing."""
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value > 0 else None


def megabytes(size: int) -> str:
    return f"{size / 2**20:,.0f} MB"
