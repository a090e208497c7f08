"""Benchmarks and experiment runners (``python -m simulations.<name>``)."""

import os

# Before numpy loads (this package is imported before any of its modules): OpenBLAS's default
# thread pool oversubscribes a busy 2-core machine and made each 128x128 eigh/SVD ~30x slower
# here (measured 26 s vs 0.8 s for one merge).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
