"""The benchmark entry points run (on the CPU with tiny shapes, once): they stay runnable for the GPU runs."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pytest_benchmark_files_run_once_on_cpu():
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "--benchmark-disable", "-p", "no:cacheprovider",
                             str(ROOT / "benchmarks")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_e2e_script_smoke():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_e2e.py"), "--smoke", "--batch", "1",
                             "--policies", "dense,incontext@64"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "spec:incontext@64" in result.stdout
