"""``moe-compress compress``'s per-method options: built from the methods' options dataclasses, refused for the
wrong method, and recorded in quantization_config.method_options as given."""

import json

import pytest

from vllm_moe_compress.offline.cli import build_parser, main
from vllm_moe_compress.offline.compress import build_method
from vllm_moe_compress.offline.methods import METHODS, method_class
from vllm_moe_compress.offline.option_args import method_flags, options_from_args

BASIS_ARGV = ["--group-size", "2", "--activation", "tanh", "--fit-steps", "3", "--fit-lr", "0.01", "--fit-patience", "4",
              "--factorize-down"]
BASIS_RECORD = {"group_size": 2, "activation": "tanh", "fit_steps": 3, "fit_lr": 0.01, "fit_patience": 4,
                "factorized": ["gate", "up", "down"]}
# Every method option set away from its default, and method_options as the checkpoint records it (in order).
ROUND_TRIPS = {
    "d2": (["--merge", "mean", "--base-prune", "0.2", "--trim-experts", "1"],
           {"merge": "mean", "base_prune": 0.2, "static_prune_ratio": 0.1, "trim_experts": 1}),
    "rs": (["--rs-score", "peak", "--rs-base", "mean", "--rs-allocation", "uniform", "--rs-sparse-share", "0.7",
            "--rs-lowrank-share", "0.4", "--rs-ridge-lambda", "0.01", "--rs-ridge-samples", "64", "--rs-lowrank-svd",
            "plain", "--rs-aci", "0.1", "0.2", "0.3", "0.4", "--rs-mine-steps", "7", "--rs-mi-bound", "0.2",
            "--rs-mi-smooth", "0.3", "--rs-mi-reg", "0.4", "--seed", "5"],
           {"score": "peak", "base": "mean", "allocation": "uniform", "sparse_share": 0.7, "lowrank_share": 0.4,
            "ridge_lambda": 0.01, "ridge_samples": 64, "lowrank_svd": "plain",
            "aci": {"w_mean": 0.1, "w_var": 0.2, "w_peak": 0.3, "gamma": 0.4},
            "mi": {"steps": 7, "hidden": 64, "lr": 0.001, "seed": 5, "bound": 0.2, "smooth": 0.3, "reg": 0.4}}),
    "mobe": (BASIS_ARGV, BASIS_RECORD),
    "rfid": (BASIS_ARGV + ["--xi", "0.5", "--effective-rank", "singular", "--residual-fraction", "0.03",
                           "--residual-seed", "9"],
             {**BASIS_RECORD, "xi": 0.5, "effective_rank": "singular", "residual_fraction": 0.03, "residual_seed": 9}),
    "svd": ([], {}),
    "whitened-svd": ([], {}),
}


def compress_argv(method: str, *options: str) -> list[str]:
    return ["compress", "MODEL", "-o", "OUT", "--method", method, "--ratio", "0.4", *options]


def test_every_method_has_a_round_trip_case_with_all_its_flags():
    assert set(ROUND_TRIPS) == set(METHODS)
    for method, (argv, _) in ROUND_TRIPS.items():
        owned = {f.flag for f in method_flags().values() if method in f.owners}
        assert owned == {a for a in argv if a.startswith("--") and a != "--seed"}, method


@pytest.mark.parametrize("method", sorted(ROUND_TRIPS))
def test_options_round_trip_from_argv_to_method_options(method):
    argv, record = ROUND_TRIPS[method]
    args = build_parser().parse_args(compress_argv(method, *argv))
    compressor = build_method(method, options_from_args(method, args))
    assert json.dumps(compressor.options()) == json.dumps(record)  # same keys, values and order
    # No flag given: the dataclass defaults, the same as the method built without options.
    defaults = options_from_args(method, build_parser().parse_args(compress_argv(method)))
    assert defaults == method_class(method).Options() and build_method(method).options() == defaults.record()


@pytest.mark.parametrize("method,option,owner", [
    ("rs", ["--merge", "mean"], "--method d2"),
    ("d2", ["--rs-score", "peak"], "--method rs"),
    ("mobe", ["--xi", "0.5"], "--method rfid"),
    ("svd", ["--group-size", "2"], "--method mobe / rfid"),
    ("whitened-svd", ["--factorize-down"], "--method mobe / rfid"),
])
def test_an_option_of_another_method_is_refused(method, option, owner, tmp_path, capsys):
    code = main(["compress", str(tmp_path / "model"), "-o", str(tmp_path / "out"), "--method", method, "--ratio", "0.4",
                 *option])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err == f"moe-compress compress: error: {option[0]} is an option of {owner}, not of --method {method}\n"
    assert list(tmp_path.iterdir()) == []


def test_a_bad_option_value_is_one_line_before_anything_is_read(tmp_path, capsys):
    code = main(["compress", str(tmp_path / "model"), "-o", str(tmp_path / "out"), "--method", "d2", "--ratio", "0.4",
                 "--base-prune", "1.5"])
    assert code == 2 and capsys.readouterr().err == (
        "moe-compress compress: error: base prune ratio must be in [0, 1), got 1.5\n")


def test_build_method_refuses_a_field_of_another_method():
    with pytest.raises(ValueError, match=r"^'merge' is an option of d2, not of method rs$"):
        build_method("rs", merge="mean")
    with pytest.raises(ValueError, match="not an option of any method"):
        build_method("d2", nonsense=1)
