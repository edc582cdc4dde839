"""`microspec.timing.timed`: the one timer of the demo and the benchmarks."""
import time

from microspec.timing import timed


def test_timed_returns_the_output_and_the_elapsed_wall_clock_off_cuda():
    seconds, out = timed(lambda: (time.sleep(0.02), "done")[1], cuda=False)
    assert out == "done" and 0.02 <= seconds < 2.0
