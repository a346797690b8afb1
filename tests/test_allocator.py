"""flatq.allocator: with freed memory retained, a large tensor allocated again reuses
the pages of the one freed before it (no page faults); glibc's default faults in every page.
Checked in fresh processes, so the setting of this one does not matter."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

import flatq.cli
from flatq import allocator as host_memory

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                                reason="mallopt tuning is specific to glibc")

# Page faults of allocating and filling a 64 MiB tensor right after an equal one was freed.
# Ten cycles first: in the first few, a small allocation sometimes lands in the freed block
# and the next big one goes above it (the heap still growing); once the free space around it
# has merged it is reused. How many cycles that takes depends on what importing flatq leaves
# on the heap: with the torch.library custom ops registered at import, 3 of 6 runs still
# faulted every page after five cycles, none of 26 after ten.
FAULTS_OF_REALLOCATION = """
import resource, sys, torch
from flatq.allocator import retain_freed_host_memory
print(retain_freed_host_memory(), file=sys.stderr)
torch.set_num_threads(1)
for _ in range(10):
    x = torch.ones(16 * 2**20)
    del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(16 * 2**20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults_of_reallocation(env_extra: dict[str, str]) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k not in host_memory.USER_MALLOC_SETTINGS}
    done = subprocess.run([sys.executable, "-c", FAULTS_OF_REALLOCATION], capture_output=True,
                          text=True, env={**env, **env_extra}, check=True, timeout=120)
    return int(done.stdout.split()[-1]), done.stderr.strip().splitlines()[-1]


@glibc_only
def test_retained_memory_is_reused_without_page_faults():
    faults, applied = faults_of_reallocation({})
    assert applied == "True"
    assert faults < 1000  # 64 MiB is 16384 pages of 4 KiB


@glibc_only
def test_glibc_default_faults_in_every_page_and_user_settings_are_left_alone():
    # The user's own malloc setting (here glibc's default threshold) wins over flatq's.
    faults, applied = faults_of_reallocation({"MALLOC_MMAP_THRESHOLD_": "131072"})
    assert applied == "False"
    assert faults > 10000


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(host_memory.ctypes, "CDLL", lambda *a: pytest.fail("loaded libc"))
    assert host_memory.retain_freed_host_memory() is False


def test_every_flatq_command_applies_it(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(flatq.cli, "retain_freed_host_memory", lambda: calls.append(1))
    assert flatq.cli.main(["eval", str(tmp_path / "missing")]) == 2
    assert calls == [1]
