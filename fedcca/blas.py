"""numpy/scipy's BLAS threads: one inside fedcca's small decompositions.

torch (OpenMP) and the OpenBLAS that numpy and scipy bundle each keep one busy-waiting worker
per core after a parallel call. A merge alternates the two libraries for every client (scipy
whitens and decomposes the features x features blocks, torch applies the transforms to the
weights), so on a small machine each waits for the other's spinning workers: aligning one
`cnn` client with CCA took 135 ms with both at two threads on two cores, 14 ms with OpenBLAS
at one (measured with the client statistics of 8 perturbed copies; CHANGELOG.md, 0.1.0). The
matrices are small (at most a few hundred features a side), so one thread is what they need.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from threadpoolctl import ThreadpoolController

_controller: ThreadpoolController | None = None


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Limit numpy's and scipy's BLAS (OpenBLAS, MKL, ...) to one thread inside the block.

    The libraries loaded when first called are the ones limited (fedcca imports scipy before
    any merge). torch's own threads are left alone.
    """
    global _controller  # pylint: disable=global-statement  # found once: listing the libraries reads the process map
    if _controller is None:
        _controller = ThreadpoolController()
    with _controller.limit(limits=1, user_api="blas"):
        yield
