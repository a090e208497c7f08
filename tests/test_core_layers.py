"""The merge library stays usable without Flower: importing it (and merging) never loads flwr."""

from __future__ import annotations

import subprocess
import sys

from tests.tiny_dataset import ROOT

LIBRARY = ("fedcca", "fedcca.alignment", "fedcca.tracing", "fedcca.statistics", "fedcca.transforms",
           "fedcca.aligners", "fedcca.config", "fedcca.merging", "fedcca.selection", "fedcca.distillation",
           "fedcca.repair", "fedcca.batchnorm", "fedcca.zipit", "fedcca.models", "fedcca.data", "fedcca.cli")


def test_the_merge_library_does_not_import_flower() -> None:
    code = (f"import sys\nfor name in {LIBRARY!r}:\n    __import__(name)\n"
            "import torch, fedcca\n"
            "from fedcca.models import build_model\n"
            "models = [build_model('lenet') for _ in range(2)]\n"
            "fedcca.merge(models, torch.randn(16, 1, 28, 28), 'cca')\n"
            "loaded = sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.'))\n"
            "assert not loaded, loaded[:5]\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
