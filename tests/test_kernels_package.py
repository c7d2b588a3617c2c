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


def test_no_import_of_the_folders_by_their_checkout_names():
    """From the repository root the folders ``offline/`` and ``kernels/`` are also importable under their folder
    names (a second copy of every module); the code must always use ``vllm_moe_compress.offline`` / ``.kernels``."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    pattern = re.compile(r"^\s*(from|import) (offline|kernels)\b", re.MULTILINE)
    offenders = [str(p.relative_to(repo)) for folder in ("offline", "kernels", "vllm_moe_compress", "tests",
                                                          "benchmarks", "loadtests")
                 for p in (repo / folder).rglob("*.py") if pattern.search(p.read_text(encoding="utf-8"))]
    assert not offenders, f"import offline/kernels by their folder names in {offenders}"


def test_plugin_and_format_never_import_the_compressor():
    """The plugin (vllm_moe_compress/*.py) imports the format package and the kernels, never the compressor; the
    format package imports neither the plugin nor the compressor (issue 15). The API-server's header check
    (``MoECompressConfig.override_quantization_method``) is the format's (``format/headers.py``)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "vllm_moe_compress"
    compressor = re.compile(r"^\s*(from (vllm_moe_compress\.offline|\.\.?offline)\b|import vllm_moe_compress\.offline)",
                            re.MULTILINE)
    plugin = re.compile(r"^\s*from (vllm_moe_compress\.(config|moe_method|scheme|base_delta|sparse_lowrank|"
                        r"basis_residual|ops)|\.\.)\b", re.MULTILINE)
    sources = {p.name: p.read_text(encoding="utf-8") for p in root.glob("*.py")}
    assert "override_quantization_method" in sources["config.py"]  # the check below does read the plugin
    assert not [name for name, text in sources.items() if compressor.search(text)]
    assert not [p.name for p in (root / "format").rglob("*.py")
                if compressor.search(p.read_text(encoding="utf-8")) or plugin.search(p.read_text(encoding="utf-8"))]
