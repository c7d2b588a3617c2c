"""Turn the output of MoBE's official ``train.py`` (inclusionAI/MoBE) into a dense checkpoint ``eval-ppl`` can score.

    python -m benchmarks.mobe_official --original ../shared/models/brown-qwen3-moe --mobe-dir runs/mobe-official/r44 \\
        --out runs/mobe-official/r44-model

``train.py`` writes, per layer and matrix type, ``model_layers_{L}_mlp_{gate,up}_proj_weight.safetensors`` holding
every expert's reconstruction A_i·φ(Σ_j α_ij B_j) (keys ``experts_{i}_{type}_weight``). The official
``get_hf_model.py`` loads them into the model's state dict; this does the same on the safetensors file directly
(no model class needed): every other tensor is copied unchanged, the reconstructions are stored in the original
dtype. The MoBE code is not part of this repository; BENCHMARKS.md §10 gives the command that ran it.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", type=Path, required=True)
    parser.add_argument("--mobe-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    src = args.original / "model.safetensors"
    tensors = {}
    with safe_open(str(src), "pt") as f:
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    replaced = 0
    for path in sorted(args.mobe_dir.glob("model_layers_*_mlp_*_proj_weight.safetensors")):
        layer, kind = path.name.split("_")[2], path.name.split("_")[4]
        for name, value in load_file(str(path)).items():
            expert = name.split("_")[1]
            key = f"model.layers.{layer}.mlp.experts.{expert}.{kind}_proj.weight"
            if key not in tensors or tensors[key].shape != value.shape:
                raise ValueError(f"{path}: {name} does not match {key} of the original")
            tensors[key] = value.to(tensors[key].dtype).contiguous()
            replaced += 1
    args.out.mkdir(parents=True, exist_ok=True)
    for side in args.original.iterdir():
        if side.name != "model.safetensors" and side.is_file():
            shutil.copy(side, args.out / side.name)
    save_file(tensors, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    print(f"wrote {args.out}: {replaced} expert matrices replaced by MoBE reconstructions")


if __name__ == "__main__":
    main()
