"""``moe-compress``: compress MoE checkpoints, evaluate perplexity, inspect compressed checkpoints."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .budget import UnreachableRatioError
from .calibration import CalibrationError
from .checkpoint_io import CheckpointError
from .format import FormatError

DEFAULT_CALIB_FILE = Path(__file__).parent / "data" / "brown-calibration-sample.txt"
USER_ERRORS = (CheckpointError, FormatError, UnreachableRatioError, CalibrationError, FileExistsError,
               FileNotFoundError, ValueError)


def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"ratio must be strictly between 0 and 1, got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .datasets import DATASETS
    from .fisher import FISHER_GRANULARITY, FISHER_LABELS
    from .methods import METHODS
    from .methods.basis_fit import ACTIVATIONS
    from .methods.d2 import MERGES
    from .methods.group_basis import EFFECTIVE_RANK_MODES

    parser = argparse.ArgumentParser(prog="moe-compress", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser(
        "compress", help="compress the routed experts of a Hugging Face MoE checkpoint",
        description="Calibrate on text, compress every routed expert with METHOD so that RATIO of the model's "
        "total parameters is removed, and write a safetensors checkpoint vLLM can serve with "
        "--quantization moe_compress. Non-expert weights are copied unchanged. The output directory "
        "appears only when complete.",
    )
    c.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face model directory (config.json + *.safetensors)")
    c.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="where to write the compressed checkpoint")
    c.add_argument("--method", required=True, choices=sorted(METHODS),
                   help="d2: D²-MoE (Fisher-merged base + whitened low-rank deltas + semi-dynamic base pruning); "
                   "svd: plain per-expert SVD; whitened-svd: per-expert SVD-LLM; mobe: MoBE (bases shared by all "
                   "experts, softmax mixing); rfid: RFID-MoE (frequency x effective-rank rank allocation over expert "
                   "groups + hashed residual)")
    c.add_argument("--ratio", type=_ratio, required=True,
                   help="fraction of TOTAL model parameters to remove, e.g. 0.6 (achieved within ±0.005)")
    g = c.add_argument_group("calibration")
    g.add_argument("--calib-file", type=Path, default=DEFAULT_CALIB_FILE,
                   help="UTF-8 text to calibrate on (default: a 200 kB Brown-corpus sample shipped with the package; "
                   "D²-MoE uses 512 samples of WikiText-2)")
    g.add_argument("--calib-samples", type=_positive, default=128, help="number of token windows (default 128)")
    g.add_argument("--calib-seqlen", type=_positive, default=512, help="tokens per window (default 512)")
    g.add_argument("--calib-batch-size", type=_positive, default=8, help="windows per forward pass (default 8)")
    g.add_argument("--seed", type=int, default=0, help="seed for window sampling and Fisher labels (default 0)")
    d = c.add_argument_group("D²-MoE options (--method d2)")
    d.add_argument("--merge", choices=MERGES, default="fisher", help="how the base is merged (default fisher, Eq. 5)")
    d.add_argument("--base-prune", type=float, default=0.1,
                   help="base pruning ratio, half static (stored) and half dynamic (per batch at inference); "
                   "default 0.1 = the paper's 5%%+5%% 'performance' setting")
    d.add_argument("--trim-experts", type=int, default=0, help="drop the deltas of the N least-routed experts per layer")
    d.add_argument("--fisher-samples", type=_positive, default=32, help="calibration windows used for Fisher (default 32)")
    d.add_argument("--fisher-labels", choices=FISHER_LABELS, default="sampled",
                   help="labels for the Fisher gradients: sampled from the model (Eq. 4, default) or the true tokens")
    d.add_argument("--fisher-granularity", choices=FISHER_GRANULARITY, default="expert",
                   help="one Fisher scalar per expert and projection (default), or a full diagonal per weight")
    b = c.add_argument_group("MoBE and RFID-MoE options (--method mobe, --method rfid)")
    b.add_argument("--group-size", type=_positive, default=4,
                   help="experts per group k (default 4); MoBE uses E/k bases, RFID-MoE E/k groups")
    b.add_argument("--activation", choices=ACTIVATIONS, default="silu",
                   help="φ applied to the bases (default silu; identity = plain grouped SVD, an ablation)")
    b.add_argument("--fit-steps", type=int, default=200, help="full-batch Adam steps per projection (default 200)")
    b.add_argument("--fit-lr", type=float, default=0.07, help="Adam learning rate on the scaled loss (default 0.07)")
    b.add_argument("--fit-patience", type=_positive, default=50,
                   help="stop after this many steps without a new best loss (default 50); the best state is kept")
    b.add_argument("--factorize-down", action="store_true",
                   help="factorise down_proj too (default: dense, as the papers); needed for high total ratios")
    b.add_argument("--xi", type=float, default=0.75,
                   help="RFID-MoE: weight of information density vs routing frequency, C = ξE + (1−ξ)F (default 0.75)")
    b.add_argument("--effective-rank", choices=EFFECTIVE_RANK_MODES, default="energy",
                   help="RFID-MoE: spectrum normalisation of the effective rank, σ² (energy, the paper) or σ")
    b.add_argument("--residual-fraction", type=float, default=0.03,
                   help="RFID-MoE: size of each group's residual vector η as a fraction of its parameters "
                   "(default 0.03; 0 turns the residual off)")
    b.add_argument("--residual-seed", type=int, default=0, help="RFID-MoE: seed of the shared projection P")
    o = c.add_argument_group("output")
    o.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="dtype of the compressed factors (default bfloat16); other tensors keep theirs")
    o.add_argument("--max-shard-size", type=_positive, default=2048, metavar="MiB", help="safetensors shard size (default 2048 MiB)")
    o.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists (only once the new one is complete)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")

    e = sub.add_parser(
        "eval-ppl", help="perplexity of a dense or compressed checkpoint on a local dataset",
        description="Perplexity over non-overlapping windows (GPTQ convention) of a local test text. "
        "Compressed checkpoints run through the pure-PyTorch reference forward.",
    )
    e.add_argument("model_dir", metavar="MODEL_DIR")
    e.add_argument("--dataset", choices=DATASETS, required=True)
    e.add_argument("--data-dir", help="the shared data directory (default: $MOE_COMPRESS_DATA)")
    e.add_argument("--max-tokens", type=_positive, help="score only the first N tokens (whole windows)")
    e.add_argument("--seqlen", type=_positive, help="window length (default min(2048, model maximum))")
    e.add_argument("--batch-size", type=_positive, default=1)
    e.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype (default float32)")
    e.add_argument("--no-dynamic-prune", action="store_true",
                   help="skip D²-MoE's per-batch dynamic base pruning (on by default, as the paper evaluates)")
    e.add_argument("--json", action="store_true", help="print a JSON object as the last line of stdout")
    e.add_argument("--no-progress", action="store_true")

    t = sub.add_parser(
        "generate", help="greedy text from a dense or compressed checkpoint (reference forward, no vLLM)",
        description="A quick check that a checkpoint still speaks: greedy decoding through transformers, "
        "compressed experts computed by the pure-PyTorch reference forward.",
    )
    t.add_argument("model_dir", metavar="MODEL_DIR")
    t.add_argument("--prompt", required=True)
    t.add_argument("--max-new-tokens", type=_positive, default=32)

    i = sub.add_parser("inspect", help="method, ratios, per-layer ranks and parameter counts of a compressed checkpoint")
    i.add_argument("model_dir", metavar="DIR")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def run_compress(args) -> int:
    from .compress import CalibrationOptions, build_method, compress_checkpoint

    method = build_method(
        args.method, merge=args.merge, base_prune=args.base_prune, trim_experts=args.trim_experts,
        group_size=args.group_size, activation=args.activation, fit_steps=args.fit_steps, fit_lr=args.fit_lr,
        fit_patience=args.fit_patience, factorize_down=args.factorize_down, xi=args.xi,
        effective_rank=args.effective_rank, residual_fraction=args.residual_fraction, residual_seed=args.residual_seed,
    )
    calibration = CalibrationOptions(
        file=args.calib_file, samples=args.calib_samples, seqlen=args.calib_seqlen, seed=args.seed,
        batch_size=args.calib_batch_size, fisher_samples=args.fisher_samples, fisher_labels=args.fisher_labels,
        fisher_granularity=args.fisher_granularity,
    )
    info = compress_checkpoint(
        args.model_dir, args.output, method, args.ratio, calibration, dtype=args.dtype, overwrite=args.overwrite,
        max_shard_bytes=args.max_shard_size * 2**20, progress=not args.no_progress,
    )
    print(f"wrote {args.output}: {args.method}, {info.original_params:,} -> {info.compressed_params:,} parameters, "
          f"ratio {info.achieved_ratio:.4f} (target {info.target_ratio}), routed experts {info.expert_ratio:.4f}")
    return 0


def run_eval_ppl(args) -> int:
    import torch

    from .datasets import load_eval_text, resolve_data_dir
    from .loading import load_model
    from .perplexity import default_seqlen, evaluate_perplexity
    from transformers import AutoTokenizer

    text = load_eval_text(args.dataset, resolve_data_dir(args.data_dir))
    model = load_model(args.model_dir, getattr(torch, args.dtype), dynamic_pruning=not args.no_dynamic_prune)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    seqlen = args.seqlen or default_seqlen(model.config)
    result = evaluate_perplexity(model, tokenizer, text, seqlen, args.max_tokens, args.batch_size,
                                 progress=not args.no_progress)
    print(f"{args.model_dir} {args.dataset}: ppl {result.ppl:.4f} over {result.tokens:,} tokens "
          f"({result.windows} windows of {result.seqlen})")
    if args.json:
        print(json.dumps({"model": str(args.model_dir), "dataset": args.dataset, **result.to_dict()}))
    return 0


def run_generate(args) -> int:
    from transformers import AutoTokenizer

    from .loading import load_model

    model = load_model(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    print(args.prompt + tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return 0


def run_inspect(args) -> int:
    from .summary import format_summary, summarize

    summary = summarize(args.model_dir)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    commands = {"compress": run_compress, "eval-ppl": run_eval_ppl, "generate": run_generate,
                "inspect": run_inspect}
    try:
        return commands[args.command](args)
    except USER_ERRORS as err:
        print(f"moe-compress {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
