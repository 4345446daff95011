"""The memory a process may still allocate, read from fake /proc and cgroup trees: a container's
limit, not the host's free memory, is what the kernel kills the process at."""

import os
import tempfile
from unittest import mock

from absl.testing import absltest

from vgg_jax import host

MB = 2**20


class MemoryRoomTest(absltest.TestCase):
    def setUp(self):
        super().setUp()
        self.root = self.create_tempdir().full_path
        self.proc = os.path.join(self.root, "proc")
        self.cgroup = os.path.join(self.root, "cgroup")
        self.write(
            "proc/meminfo", f"MemTotal: {24000 * 1024} kB\nMemAvailable: {20000 * 1024} kB\n"
        )

    def write(self, relative: str, text: str) -> None:
        path = os.path.join(self.root, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)

    def room(self):
        return host.memory_room_bytes(self.proc, self.cgroup)

    def test_no_cgroup_is_the_hosts_available_memory(self):
        self.assertEqual(self.room(), 20000 * MB)

    def test_nothing_readable_is_none(self):
        self.assertIsNone(host.memory_room_bytes(tempfile.gettempdir() + "/none", "/none"))

    def test_cgroup_v2_limit_less_its_usage_but_not_its_inactive_page_cache(self):
        self.write("proc/self/cgroup", "0::/kubepods/pod1/ctr\n")
        self.write("cgroup/kubepods/pod1/ctr/memory.max", f"{2048 * MB}\n")
        self.write("cgroup/kubepods/pod1/ctr/memory.high", "max\n")
        self.write("cgroup/kubepods/pod1/ctr/memory.current", f"{1500 * MB}\n")
        self.write("cgroup/kubepods/pod1/ctr/memory.stat", f"anon 1\ninactive_file {500 * MB}\n")
        self.assertEqual(self.room(), (2048 - 1000) * MB)

    def test_a_limit_above_the_process_cgroup_counts(self):
        """A Kubernetes pod's limit, its container's unset ("max")."""
        self.write("proc/self/cgroup", "0::/kubepods/pod1/ctr\n")
        self.write("cgroup/kubepods/pod1/ctr/memory.max", "max\n")
        self.write("cgroup/kubepods/pod1/ctr/memory.current", f"{100 * MB}\n")
        self.write("cgroup/kubepods/pod1/memory.max", f"{1024 * MB}\n")
        self.write("cgroup/kubepods/pod1/memory.current", f"{400 * MB}\n")
        self.assertEqual(self.room(), 624 * MB)

    def test_cgroup_v1_seen_from_inside_a_container(self):
        """/proc/self/cgroup names the host's path; the container's mount is its own cgroup."""
        self.write("proc/self/cgroup", "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n")
        self.write("cgroup/memory/memory.limit_in_bytes", f"{3072 * MB}\n")
        self.write("cgroup/memory/memory.usage_in_bytes", f"{1072 * MB}\n")
        self.write("cgroup/memory/memory.stat", f"cache 5\ntotal_inactive_file {72 * MB}\n")
        self.assertEqual(self.room(), 2072 * MB)

    def test_cgroup_v1_unlimited_is_the_hosts(self):
        self.write("proc/self/cgroup", "4:memory:/\n")
        self.write("cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n")
        self.write("cgroup/memory/memory.usage_in_bytes", f"{1072 * MB}\n")
        self.assertEqual(self.room(), 20000 * MB)

    def test_an_address_space_limit_leaves_its_rest_beyond_the_virtual_size(self):
        """``ulimit -v`` (Grid Engine's h_vmem): past it the decoded copy's allocation crashed
        the process in the record reader's C++."""
        self.write("proc/self/status", f"Name: python\nVmSize: {3000 * 1024} kB\n")
        limits = {host.resource.RLIMIT_AS: (3500 * MB, host.resource.RLIM_INFINITY)}
        with mock.patch.object(host.resource, "getrlimit", side_effect=limits.get):
            self.assertEqual(self.room(), 500 * MB)
        self.assertEqual(self.room(), 20000 * MB)  # no limit: this machine's test process

    def test_over_the_limit_is_no_room(self):
        self.write("proc/self/cgroup", "0::/\n")
        self.write("cgroup/memory.max", f"{100 * MB}\n")
        self.write("cgroup/memory.current", f"{300 * MB}\n")
        self.assertEqual(self.room(), 0)


class UsableCpusTest(absltest.TestCase):
    """Docker's --cpus and Kubernetes' limits.cpu are a CFS quota; os.cpu_count and the affinity
    count the host's cores."""

    def setUp(self):
        super().setUp()
        self.root = self.create_tempdir().full_path
        affinity = mock.patch.object(host.os, "sched_getaffinity", create=True)
        affinity.start().return_value = set(range(64))
        self.addCleanup(affinity.stop)

    def write(self, relative: str, text: str) -> None:
        MemoryRoomTest.write(self, relative, text)

    def cpus(self):
        return host.usable_cpus(os.path.join(self.root, "proc"), os.path.join(self.root, "cg"))

    def test_no_quota_is_the_affinity(self):
        self.write("proc/self/cgroup", "0::/\n")
        self.write("cg/cpu.max", "max 100000\n")
        self.assertEqual(self.cpus(), 64)

    def test_cgroup_v2_quota_rounds_up(self):
        self.write("proc/self/cgroup", "0::/kubepods/pod1\n")
        self.write("cg/kubepods/pod1/cpu.max", "150000 100000\n")
        self.assertEqual(self.cpus(), 2)

    def test_cgroup_v1_quota_from_inside_a_container(self):
        self.write("proc/self/cgroup", "3:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n")
        self.write("cg/cpu/cpu.cfs_quota_us", "100000\n")
        self.write("cg/cpu/cpu.cfs_period_us", "100000\n")
        self.assertEqual(self.cpus(), 1)
        self.write("cg/cpu/cpu.cfs_quota_us", "-1\n")
        self.assertEqual(self.cpus(), 64)


if __name__ == "__main__":
    absltest.main()
