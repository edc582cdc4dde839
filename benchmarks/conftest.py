"""pytest-benchmark entry points of the benchmark scripts: `pytest benchmarks/ --benchmark-only` on a GPU
(groups by size; extra_info carries µs per call, GB/s and % of the floor); on a CPU they run tiny shapes once
(`--benchmark-disable`) as a smoke test."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
