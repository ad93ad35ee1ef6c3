"""The device the engine tests run on: `SPECMESH_TEST_DEVICE=cuda pytest tests/test_engine_*.py` on a GPU."""

import os

DEVICE = os.environ.get("SPECMESH_TEST_DEVICE", "cpu")
# Logit comparisons across implementations: CUDA kernels reduce in other orders than the CPU.
ATOL = 1e-4 if DEVICE == "cpu" else 2e-3
