"""Our top-level ``kernels`` package must not look like the PyPI ``kernels`` package to transformers."""

import subprocess
import sys

SCRIPT = """
import time
t = time.perf_counter()
import transformers
from transformers.utils import is_kernels_available
import kernels
assert is_kernels_available() is False, "transformers thinks the hub 'kernels' package is installed"
assert not [m for m in sys.modules if m.startswith("triton")], "importing kernels pulled in triton"
print(time.perf_counter() - t)
"""


def test_transformers_import_stays_fast_and_kernels_unavailable():
    done = subprocess.run([sys.executable, "-c", "import sys\n" + SCRIPT], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.strip()) < 20.0  # a generous bound: a Triton/torch import chain would show as an error above
