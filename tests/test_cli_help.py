"""``--help`` is fast because building the parser imports no torch, and the help reads as terminal text."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ["", "compress", "eval-ppl", "eval-zeroshot", "generate", "inspect", "report"]
HEAVY = ("torch", "transformers", "vllm", "safetensors", "numpy")

CHILD = """
import contextlib, io, json, sys
from vllm_moe_compress.offline.cli import main
helps = {}
for command in sys.argv[1:]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main([command, "--help"] if command else ["--help"])
        except SystemExit:
            pass
    helps[command] = out.getvalue()
print(json.dumps({"helps": helps, "modules": sorted(sys.modules)}))
"""


def run_child(code: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_help_imports_no_torch_and_reads_as_plain_text():
    result = json.loads(run_child(CHILD, *COMMANDS))
    heavy = [m for m in result["modules"] if m.split(".")[0] in HEAVY]
    assert heavy == [], f"--help imported {heavy[:5]}"
    for command, text in result["helps"].items():
        assert text.startswith("usage: moe-compress"), command
        assert "`" not in text and not re.search(r"\bissue \d", text), command
    assert "--version" in result["helps"][""]


def test_parsing_a_compress_command_imports_no_torch():
    code = """
import json, sys
from vllm_moe_compress.offline.cli import build_parser
from vllm_moe_compress.offline.option_args import options_from_args
args = build_parser().parse_args(["compress", "M", "-o", "O", "--method", "rs", "--ratio", "0.4", "--rs-mine-steps", "7"])
assert options_from_args("rs", args).mi.steps == 7
print(json.dumps(sorted(sys.modules)))
"""
    heavy = [m for m in json.loads(run_child(code)) if m.split(".")[0] in HEAVY]
    assert heavy == [], f"parsing imported {heavy[:5]}"


def test_version():
    out = run_child("from vllm_moe_compress.offline.cli import main; main(['--version'])")
    assert re.fullmatch(r"moe-compress \S+.*\n", out)


def test_choices_match_the_implementations():
    from vllm_moe_compress.offline.choices import ACTIVATION_NAMES
    from vllm_moe_compress.offline.methods.basis_fit import ACTIVATIONS

    assert list(ACTIVATION_NAMES) == list(ACTIVATIONS)


def test_each_registered_method_class_has_its_name_and_options():
    from vllm_moe_compress.offline.methods import METHODS

    for name, entry in METHODS.items():
        method = entry.load()
        assert (method.name, method.Options) == (name, entry.options), name


def test_loadtest_help_has_no_issue_numbers_or_markup():
    done = subprocess.run([sys.executable, "-m", "loadtests.run", "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0 and "--soak" in done.stdout
    assert "`" not in done.stdout and not re.search(r"\bissue \d", done.stdout)
