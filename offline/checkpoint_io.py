"""Reading Hugging Face safetensors checkpoints and writing sharded ones atomically.

Only safetensors and JSON are ever read: a checkpoint that ships only ``pytorch_model.bin`` (pickle) is
refused. Output directories appear only when complete: everything is written into a hidden temporary
sibling directory, which is renamed onto the target at the very end.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vllm_moe_compress.format.headers import SAFETENSORS_DTYPES

from .output_safety import check_replaceable

WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """The input checkpoint is missing, unreadable or malformed."""


class DiskFullError(OSError):
    """The disk filled up while a checkpoint or a work directory was being written."""


def read_config(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise CheckpointError(f"model directory {model_dir} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: not a Hugging Face model directory")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err


RELEASE_BYTES = 256 * 2**20
"""Bytes read from one file after which it is reopened. ``safe_open`` maps a whole shard, and every page a read
touched stays in the process's resident memory until the file is closed (1.2 GiB for one Qwen3-30B-A3B-shaped
layer); reopening bounds that to about this much per file. Tensors already returned stay valid."""


class SafetensorsCheckpoint:
    """All tensors of a model directory (single file or sharded with an index), opened lazily."""

    def __init__(self, model_dir: str | os.PathLike):
        self.model_dir = Path(model_dir)
        files = sorted(self.model_dir.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in self.model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
            hint = f" (found {', '.join(pickles)}: pickle files are never loaded; convert to safetensors)" if pickles else ""
            raise CheckpointError(f"no *.safetensors files in {self.model_dir}{hint}")
        self._handles = {}
        self._read_since_open: dict[Path, int] = {}  # bytes read through each handle (RELEASE_BYTES)
        self._file_of: dict[str, Path] = {}
        for path in files:
            try:
                handle = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err
            self._handles[path] = handle
            self._read_since_open[path] = 0
            for key in handle.keys():
                self._file_of[key] = path
        self._check_index()

    def _check_index(self) -> None:
        """A sharded checkpoint's index must be JSON and every tensor it lists must be in the files present."""
        index = self.model_dir / INDEX_NAME
        if not index.is_file():
            return
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index: {err!r}") from err
        for name, file in weight_map.items():
            if name not in self._file_of:
                missing = "" if (self.model_dir / file).is_file() else f", and {file} is missing"
                raise CheckpointError(f"tensor {name} not found in {self.model_dir}: {index.name} lists it in {file}{missing}")

    def release_mapped_pages(self) -> None:
        """Reopen every file read from since it was opened, so that the pages those reads mapped leave the process's
        resident memory (up to RELEASE_BYTES per file otherwise stay: with one file per decoder layer, that grows with
        the number of layers a pass has read). Called when a layer is done with; tensors already returned stay valid."""
        for path, read in self._read_since_open.items():
            if read:
                self._reopen(path)

    def _reopen(self, path: Path) -> None:
        """A new handle on ``path``: the old one's mapped pages go with it (tensors already returned keep theirs)."""
        self._handles[path] = safe_open(str(path), framework="pt")
        self._read_since_open[path] = 0

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as stored (a view of the mapped file, which it keeps mapped while it lives)."""
        try:
            path = self._file_of[name]
            if self._read_since_open[path] > RELEASE_BYTES:
                self._reopen(path)
            tensor = self._handles[path].get_tensor(name)
            self._read_since_open[path] += tensor.nbytes
            return tensor
        except KeyError:
            raise CheckpointError(f"tensor {name} not found in {self.model_dir}") from None
        except SafetensorError as err:
            raise CheckpointError(f"tensor {name} in {self._file_of[name]} is corrupt: {err}") from err

    def file_of(self, name: str) -> Path:
        """The file holding tensor ``name``."""
        return self._file_of[name]

    def dtype(self, name: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self._handles[self._file_of[name]].get_slice(name).get_dtype()]

    def shape(self, name: str) -> list[int]:
        return list(self._handles[self._file_of[name]].get_slice(name).get_shape())

    def numel(self, name: str) -> int:
        n = 1
        for d in self.shape(name):
            n *= d
        return n


class ShardedWriter:
    """Writes tensors into ``model-0000i-of-0000N.safetensors`` shards of bounded size plus an index."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = 2 * 1024**3):
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in s for s in self._shards):
            raise ValueError(f"tensor {name} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous().cpu()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        index = len(self._shards)
        path = self.out_dir / f".shard-{index}.safetensors"
        try:
            save_file(self._pending, str(path), metadata={"format": "pt"})
        except SafetensorError as err:  # the Rust writer names the OS error only in its message
            if f"(os error {errno.ENOSPC})" in str(err):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err
            raise
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> None:
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.out_dir / f".shard-{i}.safetensors", self.out_dir / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy tokenizer, generation config, chat template... everything but weights, index and config.json."""
    for path in src.iterdir():
        if path.is_file() and path.suffix not in WEIGHT_FILE_SUFFIXES and path.name not in (INDEX_NAME, "config.json"):
            shutil.copy2(path, dst / path.name)


def _make_readable(root: Path) -> None:
    """mkdtemp creates 0700: give the finished tree the permissions of an ordinary directory (umask)."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.iterdir():
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False, staging_dir: Path | None = None):
    """Yield a temporary directory next to ``out_dir``; rename it onto ``out_dir`` only on success.

    On any exception the temporary directory is removed, so a failed run never leaves a directory that
    looks finished. With ``overwrite`` an existing ``out_dir`` is replaced only after the new one is complete,
    and only if it is empty or a previous moe-compress output (offline/output_safety.py), checked again just
    before the rename.
    ``staging_dir`` (on the same filesystem, e.g. the run's work directory) holds the temporary directory
    instead of ``out_dir``'s parent, so a process killed mid-write leaves its remains there.
    """
    out_dir = Path(out_dir).resolve()
    check_replaceable(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if staging_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    else:
        tmp = Path(tempfile.mkdtemp(prefix="output.partial-", dir=staging_dir))
    try:
        yield tmp
        _make_readable(tmp)
        check_replaceable(out_dir, overwrite)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "dir")
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str | None = None):
    """Yield a temporary path beside ``path`` (ending in ``suffix``, default ``path``'s own, which e.g. matplotlib
    reads the format from); rename it onto ``path`` only if the block succeeds: the file is complete or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", suffix=path.suffix if suffix is None else suffix,
                               dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
