"""benchmarks/gpu_check.sh, the GPU checks in one script, checked here by its dry run on the CPU:
every phase starts, its time and status are recorded, and the script ends by itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_dry_run_runs_every_phase_and_records_its_time(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = (tmp_path / "out" / "timing.txt").read_text().splitlines()
    phases = {line.split()[0]: line.split()[3:] for line in rows[1:-1]}
    assert phases == {p: ["ok"] for p in ("setup", "tests", "bench", "serve", "finetune", "constraints")}, rows
    assert rows[-1].startswith("total") and "== tests" in (tmp_path / "out" / "log.txt").read_text()
