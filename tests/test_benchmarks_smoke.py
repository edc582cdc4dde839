"""The benchmark entry points run (on the CPU with tiny shapes, once): they stay runnable for the GPU runs."""
import json
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


def test_e2e_script_replays_eval_traces(tmp_path):
    """A `microspec eval` trace file drives the replay; labels with a core size and a top-k suffix work, and
    a label without a trace is skipped, not run with made-up acceptance."""
    traces = tmp_path / "acceptance.json"
    traces.write_text(json.dumps({"source": "smoke", "K": 5,
                                  "traces": {"full": [5, 4, 0, 2], "incontext+core16@64/k5": [1, 0, 3]}}))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_e2e.py"), "--smoke", "--batch", "2",
                             "--policies", "dense,incontext+core16@64/k5,static@64", "--acceptance", str(traces)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "replayed from acceptance.json: smoke" in result.stdout
    assert "spec:dense" in result.stdout and "spec:incontext+core16@64/k5" in result.stdout
    assert "no trace for static@64: skipped" in result.stdout
