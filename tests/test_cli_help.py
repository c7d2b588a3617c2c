"""``--help`` is fast because building the parser imports no torch, and the help reads as terminal text.

Only ``compress`` reads its per-method options from the method modules, which import torch: its help and parsing
may import it; ``moe-compress --help``, ``--version`` and every other command's help and parsing may not."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ["", "eval-ppl", "eval-zeroshot", "generate", "inspect", "report"]  # all but compress
HEAVY = ("torch", "transformers", "vllm", "safetensors", "numpy")

CHILD = """
import contextlib, io, json, sys
from vllm_moe_compress.offline.cli import main
helps = {}
for command in sys.argv[1:]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main([*command.split(), "--help"])
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


def heavy_modules(modules: list[str]) -> list[str]:
    return [m for m in modules if m.split(".")[0] in HEAVY]


def assert_plain_text(helps: dict[str, str]) -> None:
    for command, text in helps.items():
        assert text.startswith("usage: moe-compress"), command
        assert "`" not in text and not re.search(r"\bissue \d", text), command


def test_help_imports_no_torch_and_reads_as_plain_text():
    result = json.loads(run_child(CHILD, *COMMANDS))
    assert heavy_modules(result["modules"]) == [], f"--help imported {heavy_modules(result['modules'])[:5]}"
    assert_plain_text(result["helps"])
    assert "--version" in result["helps"][""]


def test_compress_help_has_every_method_option_and_reads_as_plain_text():
    from vllm_moe_compress.offline.option_args import method_flags

    helps = json.loads(run_child(CHILD, "compress", "-v compress"))["helps"]
    assert_plain_text(helps)
    assert helps["compress"] == helps["-v compress"]  # the sub-command is found after moe-compress's own options
    assert [f for f in method_flags() if f not in helps["compress"]] == []


def test_parsing_any_other_command_imports_no_torch():
    code = """
import contextlib, io, json, sys
from vllm_moe_compress.offline.cli import main
for argv in (["eval-ppl", "M", "--dataset", "nonsense"], ["-v", "generate", "M"], ["inspect"], ["report", "D"],
             ["eval-zeroshot", "M", "--limit", "0", "--out", "F"], ["compres"], []):
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            main(argv)
        except SystemExit as exit:
            assert exit.code == 2, argv  # refused by argparse, before the command runs
        else:
            raise AssertionError(argv)
print(json.dumps(sorted(sys.modules)))
"""
    heavy = heavy_modules(json.loads(run_child(code)))
    assert heavy == [], f"parsing imported {heavy[:5]}"


def test_parsing_a_compress_command_reaches_the_method_options():
    from vllm_moe_compress.offline.cli import build_parser
    from vllm_moe_compress.offline.option_args import options_from_args

    argv = ["compress", "M", "-o", "O", "--method", "rs", "--ratio", "0.4", "--rs-mine-steps", "7"]
    assert options_from_args("rs", build_parser(commands=["compress"]).parse_args(argv)).mi.steps == 7


def test_version():
    out = run_child("from vllm_moe_compress.offline.cli import main; main(['--version'])")
    assert re.fullmatch(r"moe-compress \S+.*\n", out)


def test_choices_match_the_implementations():
    from vllm_moe_compress.offline.choices import ACTIVATION_NAMES
    from vllm_moe_compress.offline.methods.basis_fit import ACTIVATIONS

    assert list(ACTIVATION_NAMES) == list(ACTIVATIONS)


def test_each_registered_method_class_has_its_name_and_options():
    from vllm_moe_compress.offline.methods import METHODS, method_class
    from vllm_moe_compress.offline.options import MethodOptions

    for name in METHODS:
        method = method_class(name)
        assert method.name == name and issubclass(method.Options, MethodOptions), name


def test_loadtest_help_has_no_issue_numbers_or_markup():
    done = subprocess.run([sys.executable, "-m", "loadtests.run", "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0 and "--soak" in done.stdout
    assert "`" not in done.stdout and not re.search(r"\bissue \d", done.stdout)
