"""How the process runs CPU work: freed tensor memory kept for the next batch."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# Page faults while a 64 MB tensor is filled, freed and filled again, before and after
# reuse_freed_memory (the last of six rounds after it: the heap settles in the first few).
FAULTS = """
import resource, torch
from pteenet.devices import reuse_freed_memory

def faults():
    x = torch.ones(16 * 2**20); del x
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 * 2**20); del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

before = faults()
applied = reuse_freed_memory()
after = [faults() for _ in range(6)]
print(before, after[-1], applied)
"""


def _run(code: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc's allocator")
def test_freed_tensor_memory_is_reused_without_faulting_it_in_again():
    before, after, applied = _run(FAULTS)
    assert applied == "True"
    assert int(before) > 10_000  # 64 MB in 4 KB pages: glibc unmapped it and faulted it in again
    assert int(after) < int(before) // 20


def test_the_cli_keeps_freed_memory_for_every_command():
    code = ("import sys, cli.app as a\n"
            "calls = []\n"
            "a.reuse_freed_memory = lambda: calls.append(1) or True\n"
            "sys.argv = ['pteenet', 'inspect', '--help']\n"
            "try:\n    a.app()\nexcept SystemExit:\n    pass\n"
            "print(len(calls))")
    assert _run(code)[-1] == "1"
