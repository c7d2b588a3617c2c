"""Failures of ``moe-compress compress`` that are not bad input: one line on stderr, never a traceback.

Unwritable output (exit 2), Ctrl-C (exit 130, saying what was kept and that the same command resumes), and
argument errors that name the option.
"""

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_moe_compress.offline.cli import main

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "tiny-qwen3-moe-demo"
ARGS = ["--method", "svd", "--ratio", "0.4", "--calib-samples", "8", "--calib-seqlen", "64", "--no-progress"]


def test_unwritable_output_is_one_line(capsys):
    """Tests run as root, where chmod does not stop a write; /sys refuses mkdir even to root (EPERM or EROFS)
    while os.access still says it is writable, so the failure comes from the real write."""
    target = Path("/sys/moe-compress-test/out")
    if not Path("/sys").is_dir():
        pytest.skip("no /sys on this machine")
    code = main(["compress", str(DEMO), "-o", str(target), *ARGS])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("moe-compress compress: error: ") and err.count("\n") == 1, err
    assert "/sys" in err and "Traceback" not in err
    assert not target.parent.exists()


def test_ctrl_c_says_what_was_kept_and_resumes(tmp_path, caplog):
    out = tmp_path / "out"
    env = {**os.environ, "MOE_COMPRESS_CRASH_AT": "committed:0", "MOE_COMPRESS_CRASH_SIGNAL": "SIGINT",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    # A suite started in the background of a non-interactive shell inherits SIGINT ignored, and Python then keeps
    # ignoring it: the child gets the default disposition, as from a terminal, so that Ctrl-C is what it tests.
    done = subprocess.run([sys.executable, "-m", "vllm_moe_compress.offline.cli", "compress", str(DEMO), "-o", str(out), *ARGS],
                          env=env, capture_output=True, text=True, timeout=600,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert done.returncode == 128 + signal.SIGINT, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("moe-compress compress: interrupted: nothing was written to "), last
    assert "1 of 2 MoE layers are kept in " in last and "run the same command again to resume" in last
    assert not out.exists()

    with caplog.at_level(logging.INFO, logger="offline"):
        assert main(["compress", str(DEMO), "-o", str(out), *ARGS]) == 0
    assert "resuming from layer 1" in caplog.text and (out / "config.json").is_file()


@pytest.mark.parametrize("option, value", [("--ratio", "abc"), ("--calib-samples", "many")])
def test_bad_number_names_the_option(tmp_path, capsys, option, value):
    argv = ["compress", str(DEMO), "-o", str(tmp_path / "out"), "--method", "svd", "--ratio", "0.4", option, value]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"argument {option}: " in err and f"'{value}'" in err and "_ratio" not in err
    assert "_positive" not in err
