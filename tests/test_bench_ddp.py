"""benchmarks/bench_ddp.py refuses what it cannot compare before fitting anything."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_a_ratio_outside_zero_to_one_is_refused_naming_the_option() -> None:
    done = subprocess.run(  # noqa: S603 - our interpreter and script
        [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_ddp.py"), "--ratios", "0.1", "1"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 2
    assert "--ratios must lie in (0, 1)" in done.stderr
