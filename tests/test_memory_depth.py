"""Peak memory of a compression run does not grow with the model's depth (issue 16's CI check).

A model with many experts and wide enough layers that holding every layer would show: 32 experts of width 128
on hidden 256 (3.1 M expert parameters, 12.6 MB in float32, per layer). Each run is a fresh process (the peak
RSS, ``moe_compress_stats.json``'s ``peak_rss_bytes``, is a process high-water mark); 2 and 6 decoder layers
are compressed with the same arguments, and the deeper model may not peak more than a fraction of one layer
higher, where keeping the 4 extra layers would add at least 50 MB. The output is assembled shard by shard, and
the writer holds one shard (``--max-shard-size``): a small shard here, so that the measured peak is the
compression's, not the size of the output.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys

import pytest

from vllm_moe_compress.format import STATS_FILE

from conftest import CALIBRATION_FILE, tiny_config, write_tiny_model

MIB = 2**20
SLACK = 12 * MIB
"""Allowed growth from 2 to 6 layers: allocator noise and the per-layer records (one layer is 12.6 MB)."""


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory):
    models = {}
    for layers in (2, 6):
        config = tiny_config("qwen3_moe")
        config.num_hidden_layers, config.hidden_size, config.num_experts = layers, 256, 32
        config.moe_intermediate_size, config.num_attention_heads, config.num_key_value_heads = 128, 4, 2
        config.head_dim = 64
        models[layers] = write_tiny_model(config, tmp_path_factory.mktemp(f"wide{layers}") / "model")
    return models


# The source's shards are small here, below the checkpoint reader's release threshold (checkpoint_io.RELEASE_BYTES,
# 256 MiB): the file pages a run has read would stay mapped and grow with depth if each layer's were not released
# when it is done with (SafetensorsCheckpoint.release_mapped_pages).
CHILD = """
import sys
from vllm_moe_compress.offline.cli import main
sys.exit(main(sys.argv[1:]))
"""


METHOD_ARGS = {"d2": ["--merge", "mean"], "rfid": ["--fit-steps", "10"], "mobe": ["--fit-steps", "10"]}
"""Short fits: the memory of a fit does not depend on its number of steps."""


def peak_rss(model, out, method: str) -> int:
    """Compress ``model`` in a fresh process; its peak RSS from the stats file."""
    subprocess.run(
        [sys.executable, "-c", CHILD, "compress", str(model), "-o", str(out),
         "--method", method, "--ratio", "0.4", "--calib-file", str(CALIBRATION_FILE), "--calib-samples", "4",
         "--calib-seqlen", "32", "--dtype", "float32", "--max-shard-size", "4", "--no-progress",
         *METHOD_ARGS.get(method, [])],
        check=True, capture_output=True,
    )
    return json.loads((out / STATS_FILE).read_text())["peak_rss_bytes"]


@pytest.mark.parametrize("method", ["whitened-svd", "d2", "rs", "rfid", "mobe"])
def test_peak_rss_does_not_grow_with_depth(wide_models, tmp_path, method):
    shallow = peak_rss(wide_models[2], tmp_path / "two", method)
    deep = peak_rss(wide_models[6], tmp_path / "six", method)
    assert deep < shallow + SLACK, f"{method}: {shallow / MIB:.0f} MiB at 2 layers, {deep / MIB:.0f} MiB at 6"


RELEASE_CHILD = """
import json, threading
import psutil, torch
from vllm_moe_compress.offline.calibration import release_freed_memory

def rss():
    return psutil.Process().memory_info().rss

def churn(kept):
    # many heap-sized blocks (below glibc's mmap threshold) freed except every 64th, which pins the heap
    blocks = [torch.ones(16 * 1024) for _ in range(12000)]  # 64 KiB each, 750 MiB
    kept.extend(blocks[::64])
    del blocks

kept = []
worker = threading.Thread(target=churn, args=(kept,))  # a worker thread's arena, as the factorisation's
worker.start(); worker.join()
before = rss()
release_freed_memory()
print(json.dumps({"before": before, "after": rss()}))
"""


def test_release_freed_memory_returns_the_freed_heap():
    """The retained heap between layers (BENCHMARKS.md §12.4) is given back: most of 750 MiB freed by a worker
    thread, pinned by blocks kept here and there, leaves the resident set after ``release_freed_memory``."""
    done = subprocess.run([sys.executable, "-c", RELEASE_CHILD], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rss = json.loads(done.stdout)
    assert rss["before"] - rss["after"] > 400 * MIB, rss


MAPPED_CHILD = """
import ctypes, json
import torch
from vllm_moe_compress.offline.calibration import mapped_large_blocks, release_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                 "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def mapped_for_4_mib():
    release_freed_memory()  # as before each decoder layer: a free top of the heap would serve the block
    before = libc.mallinfo2().hblkhd
    block = torch.ones(2**20)
    mapped = libc.mallinfo2().hblkhd - before
    del block
    return mapped

first = mapped_for_4_mib()
big = torch.ones(6 * 2**20)  # 24 MiB, mapped and freed, as a compressed layer frees its blocks
del big
after_layer = mapped_for_4_mib()
with mapped_large_blocks():
    forward = mapped_for_4_mib()
print(json.dumps({"first": first, "after_layer": after_layer, "forward": forward, "after": mapped_for_4_mib()}))
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="glibc >= 2.33 only (mallinfo2)")
def test_each_layer_forward_maps_its_blocks_as_the_first_did():
    """What a compressed layer frees raises glibc's mmap threshold, and the next layer's forward then put its
    activations in the heap and peaked 150–210 MiB higher than the first layer's at Qwen3-30B-A3B's shapes
    (BENCHMARKS.md §12.17): under ``mapped_large_blocks`` (each layer's build and forward) a 4 MiB block is mapped
    again, as in a fresh process; afterwards the rest of the run gets the threshold glibc's adjustment reaches."""
    done = subprocess.run([sys.executable, "-c", MAPPED_CHILD], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["first"] >= 4 * MIB and got["forward"] >= 4 * MIB, got
    assert got["after_layer"] == 0 and got["after"] == 0, got
