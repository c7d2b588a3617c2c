"""Resumable compression: a work directory that journals every finished MoE layer.

A compression run keeps its intermediate results in ``.{OUT}.work-{KEY}/``, a hidden sibling of the output
directory. ``KEY`` hashes everything the result depends on (:func:`run_arguments`), so a run started again
with the same arguments continues where the last one stopped, and a run with different arguments never
reads another's work. Layout::

    arguments.json          what KEY was computed from (checked again on resume)
    compress.log            the log of every attempt (appended; copied into the output at the end)
    fisher.safetensors      D²-MoE's Fisher estimate ("{layer}.{proj}"), computed once
    layer-{L}.safetensors   MoE layer L's checkpoint tensors, already named and cast for the output
    layer-{L}.json          its quantization_config entry, statistics and parameter count — the commit record
    hidden-{L}.safetensors  calibration hidden states leaving decoder layer L ("batch.{b}"), latest layer only
    output.partial-*/       the output being assembled (renamed onto OUT when complete)
    .lock                   advisory lock held by the running process

Every file is written under a temporary name, fsynced and renamed (:func:`atomic_write`), so after a SIGKILL
or power loss a file is either complete or absent. Layer L counts as finished once ``layer-L.json`` exists; it
is written after the layer's tensors and hidden states, so a finished layer always has both.

Choice (resume point): the hidden states entering the next layer are checkpointed rather than recomputed,
so resuming costs one file read instead of re-running every finished decoder layer, and the resumed layers
see bit-identical inputs. The Fisher estimate is cached for the same reason. Everything downstream (the
output checkpoint) is assembled from these files, in an interrupted run and an uninterrupted one alike, so
both write byte-identical safetensors, index and config.json.

``MOE_COMPRESS_CRASH_AT`` is a fault-injection hook for the resume tests: when it names a point passed to
:func:`crash_point`, the process SIGKILLs itself there.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import signal
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from vllm_moe_compress.format import FORMAT_VERSION

from .checkpoint_io import WEIGHT_FILE_SUFFIXES, atomic_file

log = logging.getLogger(__name__)

CRASH_ENV = "MOE_COMPRESS_CRASH_AT"
CRASH_SIGNAL_ENV = "MOE_COMPRESS_CRASH_SIGNAL"
WORK_FORMAT = 1
"""Bump when the work directory's layout changes: older work directories then get a different key."""


class WorkDirError(RuntimeError):
    """The work directory is locked by another run or was tampered with."""


def crash_point(name: str) -> None:
    """Fault injection for tests: SIGKILL this process if ``$MOE_COMPRESS_CRASH_AT == name`` (or send it the
    signal named by ``$MOE_COMPRESS_CRASH_SIGNAL``, e.g. SIGINT for a Ctrl-C)."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), getattr(signal, os.environ.get(CRASH_SIGNAL_ENV, "SIGKILL")))


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_file`, fsynced before the rename (a crash point between
    the two halves lets the tests kill a run mid-write; the ``.tmp`` file it leaves is swept by the next run)."""
    with atomic_file(path, suffix=".tmp") as tmp, open(tmp, "wb") as f:
        half = len(data) // 2
        f.write(data[:half])
        crash_point(f"write:{path.name}")
        f.write(data[half:])
        f.flush()
        os.fsync(f.fileno())


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_identity(model_dir: Path) -> dict:
    """Who the input model is, cheaply: the resolved path; per file, the content hash of small side files and
    (size, mtime) of weight files (hashing hundreds of GB of weights would take longer than a layer)."""
    files = {}
    for path in sorted(p for p in model_dir.iterdir() if p.is_file()):
        st = path.stat()
        files[path.name] = ({"size": st.st_size, "mtime_ns": st.st_mtime_ns} if path.suffix in WEIGHT_FILE_SUFFIXES
                            else {"sha256": _sha256_file(path)})
    return {"path": str(model_dir.resolve()), "files": files}


def run_arguments(model_dir: Path, method, ratio: float, calibration, dtype: str) -> dict:
    """Everything a compression result depends on (output-only settings such as shard size excluded, and
    ``compress --device``: a run resumed on another device is the same run)."""
    calib = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(calibration).items()}
    calib["file_sha256"] = _sha256_file(Path(calibration.file))
    return {
        "work_format": WORK_FORMAT, "format_version": FORMAT_VERSION, "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"), "model": model_identity(model_dir),
        "method": {"name": method.name, "class": f"{type(method).__module__}.{type(method).__qualname__}",
                   "options": method.options()},
        "ratio": ratio, "calibration": calib, "dtype": dtype,
    }


def run_key(arguments: dict) -> str:
    return hashlib.sha256(json.dumps(arguments, sort_keys=True).encode()).hexdigest()[:16]


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


class WorkDir:
    """The journal of one compression run (see the module docstring); use as a context manager (it locks)."""

    def __init__(self, out_dir: str | os.PathLike, arguments: dict):
        out_dir = Path(out_dir).resolve()
        self.arguments = arguments
        self.path = out_dir.parent / f".{out_dir.name}.work-{run_key(arguments)}"
        self._lock = None

    def __enter__(self) -> "WorkDir":
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path / ".lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise WorkDirError(f"another moe-compress run with the same arguments is using {self.path}") from None
        recorded = self.path / "arguments.json"
        if recorded.is_file():
            if json.loads(recorded.read_text()) != json.loads(_json_bytes(self.arguments)):
                raise WorkDirError(f"{recorded} does not match this run's arguments; delete {self.path} to start over")
        else:
            atomic_write(recorded, _json_bytes(self.arguments))
        for stale in self.path.glob("output.partial-*"):  # left by an attempt killed while assembling
            shutil.rmtree(stale)
        for stale in self.path.glob(".*.tmp"):  # left by an attempt killed inside atomic_write
            stale.unlink()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.close()  # closing the descriptor releases the flock

    @property
    def log_path(self) -> Path:
        return self.path / "compress.log"

    def finished_layers(self, moe_layers: list[int]) -> list[int]:
        """The leading MoE layers (in order) whose commit record exists."""
        done = []
        for layer in moe_layers:
            if not (self.path / f"layer-{layer}.json").is_file():
                break
            done.append(layer)
        return done

    def fisher(self, compute) -> dict[int, dict[str, torch.Tensor]]:
        """The cached Fisher estimate, or ``compute()`` stored for the next attempt."""
        path = self.path / "fisher.safetensors"
        if path.is_file():
            log.info("reusing the Fisher estimate cached in %s", path)
            fisher: dict[int, dict[str, torch.Tensor]] = {}
            for name, tensor in self._read_tensors(path).items():
                layer, proj = name.split(".")
                fisher.setdefault(int(layer), {})[proj] = tensor
            return fisher
        fisher = compute()
        atomic_write(path, save({f"{layer}.{proj}": t.contiguous() for layer, d in fisher.items() for proj, t in d.items()}))
        crash_point("fisher-saved")
        return fisher

    def layer_weights(self, compute) -> dict[int, float] | None:
        """The method's per-layer budget weights (RS-MoE's MI allocation), cached like the Fisher estimate."""
        path = self.path / "layer-weights.json"
        if path.is_file():
            log.info("reusing the layer budget weights cached in %s", path)
            stored = json.loads(path.read_text())
            return None if stored is None else {int(layer): weight for layer, weight in stored.items()}
        weights = compute()
        atomic_write(path, _json_bytes(weights))
        return weights

    def hidden_after(self, layer: int) -> list[torch.Tensor]:
        """Calibration hidden states leaving decoder layer ``layer``, one tensor per batch."""
        path = self.path / f"hidden-{layer}.safetensors"
        if not path.is_file():
            raise WorkDirError(f"{path} is missing although layer {layer} is finished; delete {self.path} to start over")
        tensors = self._read_tensors(path)
        return [tensors[f"batch.{b}"] for b in range(len(tensors))]

    def commit_layer(self, layer: int, tensors: dict[str, torch.Tensor], record: dict,
                     hidden: list[torch.Tensor]) -> None:
        """Journal MoE layer ``layer``: tensors, hidden states leaving it, then the record that marks it done."""
        atomic_write(self.path / f"layer-{layer}.safetensors", save(tensors))
        atomic_write(self.path / f"hidden-{layer}.safetensors",
                     save({f"batch.{b}": h.contiguous() for b, h in enumerate(hidden)}))
        atomic_write(self.path / f"layer-{layer}.json", _json_bytes({**record, "tensor_names": list(tensors)}))
        for older in self.path.glob("hidden-*.safetensors"):
            if older.name != f"hidden-{layer}.safetensors":
                older.unlink()
        crash_point(f"committed:{layer}")

    def layer_record(self, layer: int) -> dict:
        return json.loads((self.path / f"layer-{layer}.json").read_text())

    def layer_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        """The layer's tensors in the order the method produced them."""
        tensors = self._read_tensors(self.path / f"layer-{layer}.safetensors")
        return {name: tensors[name] for name in self.layer_record(layer)["tensor_names"]}

    def drop_hidden_states(self) -> None:
        for path in self.path.glob("hidden-*.safetensors"):
            path.unlink()

    def remove(self) -> None:
        shutil.rmtree(self.path)

    @staticmethod
    def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
