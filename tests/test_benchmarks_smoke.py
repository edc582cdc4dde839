"""The benchmark entry points run (on the CPU with tiny shapes, once): they stay runnable for the GPU runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_pytest_benchmark_files_run_once_on_cpu():
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "--benchmark-disable",
                             "-p", "no:cacheprovider", str(ROOT / "benchmarks")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_e2e_script_smoke():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_e2e.py"), "--smoke",
                             "--batch", "1", "--policies", "dense,incontext@64"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "spec:incontext@64" in result.stdout


def test_policy_step_script_smoke():
    """bench_policy_step.py times the old and the new per-step policy work side by side; on the CPU it only
    checks that both run and that the kernel's top-k values equal torch.topk's."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_policy_step.py"), "--smoke"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "microspec" in result.stdout and "ours" in result.stdout and "MISMATCH" not in result.stdout


def test_linear_script_smoke():
    """bench_linear.py times cuBLAS against the skinny kernel per projection; on the CPU (the kernel under the
    Triton interpreter) it checks that both run and agree."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_linear.py"), "--smoke"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "step (2 layers)" in result.stdout and "REL ERR" not in result.stdout


def test_e2e_script_replays_eval_traces(tmp_path):
    """A `microspec eval` trace file drives the replay; labels with a core size and a top-k suffix work, and
    a label without a trace is skipped, not run with made-up acceptance."""
    traces = tmp_path / "acceptance.json"
    traces.write_text(json.dumps({"source": "smoke", "K": 5,
                                  "traces": {"full": [5, 4, 0, 2], "incontext+core16@64/k5": [1, 0, 3]}}))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_e2e.py"), "--smoke",
                             "--batch", "2", "--policies", "dense,incontext+core16@64/k5,static@64",
                             "--acceptance", str(traces)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "replayed from acceptance.json: smoke" in result.stdout
    assert "spec:dense" in result.stdout and "spec:incontext+core16@64/k5" in result.stdout
    assert "no trace for static@64: skipped" in result.stdout


@pytest.mark.real_model
@pytest.mark.slow
def test_real_e2e_run_smoke(tmp_path, smollm2_gguf):
    """`real_e2e.py run` on the real SmolLM2 weights with a random EAGLE head (float32, greedy, one prompt):
    every method writes a row, and the speculative rows equal plain greedy decoding."""
    from microspec.drafting.eagle import EagleDrafter
    weights = smollm2_gguf.path
    if not (ROOT / "benchmarks" / "real_e2e" / "smollm2.pt").is_file():
        pytest.skip("no prepared prompts (benchmarks/real_e2e.py prepare --model smollm2 --name smollm2)")
    target, _ = smollm2_gguf.load(torch.float32)
    EagleDrafter.from_target(target, seed=0).save_pretrained(tmp_path / "eagle")
    del target
    env = {**os.environ, "OMP_NUM_THREADS": "1"}    # a busy shared CPU: 2 spinning threads run ~30x slower
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "real_e2e.py"), "run",
                             "--model", str(weights), "--name", "smollm2", "--eagle", str(tmp_path / "eagle"),
                             "--limit", "1", "--batch", "1", "--modes", "greedy", "--new", "4",
                             "--methods", "plain", "eagle2", "microspec",
                             "--dtype", "float32", "--no-compile",
                             "--top-k", "3", "--depth", "3", "--total-tokens", "8", "--out", str(tmp_path)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    (path,) = tmp_path.glob("real_e2e_smollm2_*.json")
    rows = {r["method"]: r for r in json.loads(path.read_text())["rows"]}
    assert set(rows) == {"plain", "eagle2", "microspec"}
    for method in ("eagle2", "microspec"):
        assert rows[method]["compared_rows"] == 1, rows[method]
        assert rows[method]["equal_rows"] == rows[method]["compared_rows"], rows[method]["tie_gaps"]
        assert rows[method]["update_us"] > 0 and rows[method]["policy_us"] > 0     # the policy's step work
    assert "| microspec | 1 | greedy |" in result.stdout


def test_step_profile_counts_ops_per_stage_on_cpu(tmp_path):
    """`step_profile.py` on a tiny Gemma3 (CPU: no CUDA kernels, so it reports the aten ops per stage): every
    stage of a tree step is labelled, and the draft stages exist only for the speculative config."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_profile.py"), "--shape",
                             "tiny-gemma3", "--configs", "plain", "microspec:3,3,8", "--new", "24",
                             "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    plain, spec = result.stdout.split("== microspec:3,3,8")
    assert "target" in plain and "draft.layer" not in plain
    for stage in ("target", "draft.layer", "draft.head", "draft.tree", "verify", "commit", "policy.update"):
        assert f"   {stage} " in spec, stage


def test_attention_variants_agree_on_cpu():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_attention.py"), "--smoke",
                             "--variants", "sdpa", "math", "lean"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    errors = [float(e) for e in __import__("re").findall(r"err ([0-9.e+-]+)\)", result.stdout)]
    assert len(errors) == 6 and max(errors) < 1e-5


def test_plot_real_e2e_tables_the_committed_results(tmp_path):
    results = sorted((ROOT / "benchmarks" / "results").glob("real_e2e_smollm2_2026-12-01_033813.json"))
    assert results, "the committed real_e2e result is missing"
    png = tmp_path / "tasks.png"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot_real_e2e.py"), str(results[0]),
                             "--png", str(png)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "| gsm8k | 875 | 1571 (τ 2.95)" in result.stdout and png.stat().st_size > 10_000
