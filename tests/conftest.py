"""Shared test set-up: Triton interpreter on CPU, Hypothesis profiles, seeds, GPU markers, the real SmolLM2
weights."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("dev", max_examples=10, deadline=None)
settings.register_profile("ci", max_examples=25, derandomize=True, deadline=None, database=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("nightly", max_examples=500, deadline=None)
settings.load_profile(os.getenv("HYPOTHESIS_PROFILE", "ci" if os.getenv("CI") else "dev"))

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA required")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="CUDA required")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class SmolLM2:
    """The real SmolLM2-135M-Instruct GGUF of the real-weight tests: `path`, and `load(dtype)` -> (model,
    tokenizer). Each `load` is a fresh copy: the tests want different dtypes, and some change their model
    (lean backends, drafters over its layers), so a cached one would leak between them."""

    def __init__(self, path):
        self.path = path

    def load(self, dtype: torch.dtype = torch.float32):
        from microspec.models import load_gguf
        return load_gguf(self.path, dtype=dtype)


@pytest.fixture(scope="session")
def smollm2_gguf() -> SmolLM2:
    """The SmolLM2 weights where `microspec.models.find_smollm2` looks ($MICROSPEC_MODELS_DIR,
    ../shared/models, the cache), never downloaded; a test that asks for them is skipped, saying what is
    missing, when they or the `gguf` reader are absent."""
    from microspec.models import find_smollm2
    from microspec.models.loading import SMOLLM2_FILE
    from microspec.paths import shared_data_dir
    path = find_smollm2(download=False)
    if path is None:
        shared = shared_data_dir(required=False)
        where = ("../shared is absent (or hidden by MICROSPEC_NO_SHARED)" if shared is None
                 else f"{SMOLLM2_FILE} is not in {shared.parent / 'models'}")
        pytest.skip(f"SmolLM2 weights not found: {where}, nor in $MICROSPEC_MODELS_DIR or the microspec "
                    "cache (tests never download them)")
    pytest.importorskip("gguf", reason="the `gguf` package (reader of the SmolLM2 file) is not installed")
    return SmolLM2(path)
