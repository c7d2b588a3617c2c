"""The install puts one top-level package, ``vllm_moe_compress``: no ``kernels`` (the name of Hugging Face's PyPI
package, which transformers probes for), ``offline`` or ``loadtests`` is importable outside the checkout, and
importing the kernels subpackage does not pull in Triton."""

import subprocess
import sys

SCRIPT = """
import importlib.util, sys, time
t = time.perf_counter()
import transformers
from transformers.utils import is_kernels_available
import vllm_moe_compress.kernels
assert is_kernels_available() is False, "transformers thinks the hub 'kernels' package is installed"
assert not [m for m in sys.modules if m.startswith("triton")], "importing the kernels package pulled in triton"
for name in ("kernels", "offline", "loadtests", "benchmarks"):
    assert importlib.util.find_spec(name) is None, f"a top-level {name!r} is installed"
print(time.perf_counter() - t)
"""


def test_one_top_level_package_and_transformers_import_stays_fast(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.strip()) < 20.0  # a generous bound: a Triton/torch import chain would show as an error above
