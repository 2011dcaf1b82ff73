"""punkdiff.precision: the CPU's native bf16, read from its flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from punkdiff.precision import cpu_has_native_bf16

CPUINFO = Path("/proc/cpuinfo")


@pytest.mark.skipif(not CPUINFO.exists(), reason="no /proc/cpuinfo to read the CPU's flags from")
def test_native_bf16_matches_the_cpu_flags():
    flags = next(line for line in CPUINFO.read_text().splitlines() if line.startswith("flags")).split()
    assert cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_tile" in flags)
