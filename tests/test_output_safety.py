"""``compress -o`` never writes over its input or over a directory it did not write (offline/output_safety.py).

Each refusal is checked at the command line: exit code 2, one ``moe-compress compress: error:`` line, and every
file that was there before still there with the same bytes, and no work or temporary directory left.
"""

import json
import shutil
from pathlib import Path

import pytest

from vllm_moe_compress.offline.cli import main
from vllm_moe_compress.offline.output_safety import OutputPathError, check_replaceable

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "tiny-qwen3-moe-demo"
FAST = ["--calib-samples", "8", "--calib-seqlen", "64", "--no-progress"]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (directories as None, symlinks as their target) with its bytes."""
    tree = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            tree[rel] = str(path.readlink()).encode()
        elif path.is_dir():
            tree[rel] = None
        else:
            tree[rel] = path.read_bytes()
    return tree


@pytest.fixture
def model(tmp_path) -> Path:
    """A copy of the demo model in tmp_path/parent/model, next to an unrelated file."""
    model = tmp_path / "parent" / "model"
    shutil.copytree(DEMO, model)
    (tmp_path / "parent" / "notes.txt").write_text("the user's own file\n")
    return model


def refused(tmp_path: Path, capsys, model: Path, out: Path, *extra: str) -> str:
    """Run compress, assert it is refused with one error line and nothing under tmp_path changed."""
    before = snapshot(tmp_path)
    code = main(["compress", str(model), "-o", str(out), "--method", "svd", "--ratio", "0.4", *FAST, *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("moe-compress compress: error: ") and err.count("\n") == 1, err
    assert snapshot(tmp_path) == before
    return err


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_output_is_the_input(tmp_path, capsys, model, overwrite):
    assert "is the input model directory" in refused(tmp_path, capsys, model, model, *overwrite)


def test_output_contains_the_input(tmp_path, capsys, model):
    err = refused(tmp_path, capsys, model, model.parent, "--overwrite")
    assert "contains the input model directory" in err


def test_output_inside_the_input(tmp_path, capsys, model):
    assert "inside the input model directory" in refused(tmp_path, capsys, model, model / "compressed")


def test_symlink_to_the_input(tmp_path, capsys, model):
    link = tmp_path / "link"
    link.symlink_to(model, target_is_directory=True)
    assert "is the input model directory" in refused(tmp_path, capsys, model, link, "--overwrite")
    # the input named through the symlink, the output its real parent
    assert "contains the input model directory" in refused(tmp_path, capsys, link, model.parent, "--overwrite")


def test_symlinked_parent_of_the_input(tmp_path, capsys, model):
    alias = tmp_path / "alias"
    alias.symlink_to(model.parent, target_is_directory=True)
    assert "contains the input model directory" in refused(tmp_path, capsys, model, alias, "--overwrite")
    assert "inside the input model directory" in refused(tmp_path, capsys, alias / "model", model / "out")


def test_overwrite_refuses_a_directory_it_did_not_write(tmp_path, capsys, model):
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("irreplaceable\n")
    err = refused(tmp_path, capsys, model, other, "--overwrite")
    assert "not a previous moe-compress output" in err and "remove the directory yourself" in err


def test_overwrite_refuses_a_dense_model(tmp_path, capsys, model):
    dense = tmp_path / "dense"
    shutil.copytree(DEMO, dense)  # config.json without quantization_config
    assert "not a previous moe-compress output" in refused(tmp_path, capsys, model, dense, "--overwrite")


def test_output_path_is_a_file(tmp_path, capsys, model):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"keep me")
    assert "exists and is not a directory" in refused(tmp_path, capsys, model, target, "--overwrite")
    assert "is a file, not a directory" in refused(tmp_path, capsys, model, target / "out")


def test_overwrite_accepts_an_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", overwrite=True)
    with pytest.raises(OutputPathError, match="already exists"):
        check_replaceable(tmp_path / "empty", overwrite=False)


def test_overwrite_replaces_a_previous_output(tmp_path, model):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "moe_compress"}}))
    (out / "model-00001-of-00001.safetensors").write_bytes(b"old")
    assert main(["compress", str(model), "-o", str(out), "--method", "svd", "--ratio", "0.4", *FAST,
                 "--overwrite"]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "moe_compress" and qc["method"] == "svd"
    assert (out / "model-00001-of-00001.safetensors").read_bytes() != b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "parent"]  # no work or old directory left


def test_eval_zeroshot_out_replaces_only_its_own_results(tmp_path, capsys):
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}\n')
    code = main(["eval-zeroshot", str(DEMO), "--out", str(notes), "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "is not a previous eval-zeroshot result" in err
    assert notes.read_text() == '{"mine": 1}\n'


def test_report_out_refuses_a_foreign_report(tmp_path, capsys):
    (tmp_path / "report.md").write_text("my own report\n")
    code = main(["report", str(DEMO), "--out", str(tmp_path)])
    assert code == 2 and "did not write" in capsys.readouterr().err
    assert (tmp_path / "report.md").read_text() == "my own report\n"
