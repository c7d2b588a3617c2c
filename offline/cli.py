"""moe-compress: compress the routed experts of MoE checkpoints, evaluate perplexity and zero-shot accuracy,
inspect and report.

Building the parser imports neither torch nor transformers (choices come from offline/choices.py, the methods'
names from their registry, offline/methods/__init__.py), except compress's per-method options: they are read from
the method modules, which import torch. So ``main`` builds the arguments of the sub-command it runs only, and
``--help``, ``--version`` and every other command answer at once; each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Collection
from pathlib import Path

from .choices import FISHER_BATCH_TOKENS, FISHER_GRANULARITY, FISHER_LABELS, TASK_SOURCES, ZEROSHOT_TASKS
from .evaluation.datasets import DATASETS
from .methods import METHODS
from .option_args import add_method_flags, options_from_args

DEFAULT_CALIB_FILE = Path(__file__).parent / "data" / "brown-calibration-sample.txt"
DESCRIPTION = ("Compress the routed experts of a Hugging Face MoE checkpoint (D²-MoE, RS-MoE, MoBE, RFID-MoE, SVD "
               "baselines) into a checkpoint vLLM serves with --quantization moe_compress; evaluate, inspect and "
               "report on it.")


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input or environment: one line on stderr and exit 2, not a traceback.
    Imported here, not at module level, because these modules import torch."""
    from .budget import UnreachableRatioError
    from .calibration import CalibrationError
    from .checkpoint_io import CheckpointError, DiskFullError
    from vllm_moe_compress.format import FormatError

    from .workdir import WorkDirError

    return (CheckpointError, FormatError, UnreachableRatioError, CalibrationError, FileExistsError,
            FileNotFoundError, ValueError, DiskFullError, WorkDirError)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vllm-moe-compress")
    except PackageNotFoundError:
        return "unknown (not installed; running from a source tree)"


def _ratio(text: str) -> float:
    """argparse type: a float in (0, 1); argparse prefixes the message with the option's name."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"ratio must be a number strictly between 0 and 1, got {text!r}")
    return value


def _positive(text: str) -> int:
    """argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The command line, with the arguments of the sub-commands in ``commands`` (default: all of them; the others
    are listed, without their arguments)."""
    parser = argparse.ArgumentParser(prog="moe-compress", description=DESCRIPTION)
    parser.add_argument("-V", "--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, _) in COMMANDS.items():
        summary, _, description = add_arguments.__doc__.partition("\n\n")
        command = sub.add_parser(name, help=summary, description=description)  # argparse refills the text
        if commands is None or name in commands:
            add_arguments(command)
    return parser


def _add_checkpoint_dir(parser: argparse.ArgumentParser) -> None:
    """The MODEL_DIR positional of the commands that read a dense or compressed checkpoint."""
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a dense Hugging Face model or a compressed checkpoint")


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    """The shared data directory (evaluation texts and task files)."""
    parser.add_argument("--data-dir", help="the shared data directory (default: $MOE_COMPRESS_DATA)")


def _add_task_data(parser: argparse.ArgumentParser) -> None:
    """Where zero-shot tasks read their documents: --tasks-source and --data-dir."""
    parser.add_argument("--tasks-source", choices=TASK_SOURCES, default="local",
                        help="local: the data directory's copies, no hub (default); hub: lm-eval's standard datasets")
    _add_data_dir(parser)


def _add_compress(c: argparse.ArgumentParser) -> None:
    """compress the routed experts of a Hugging Face MoE checkpoint

    Calibrate on text, compress every routed expert with METHOD so that RATIO of the model's total parameters is
    removed, and write a safetensors checkpoint vLLM can serve with --quantization moe_compress. Non-expert weights
    are copied unchanged. The output directory appears only when complete.
    """
    c.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face model directory (config.json + *.safetensors)")
    c.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="where to write the compressed checkpoint")
    c.add_argument("--method", required=True, choices=list(METHODS),
                   help="d2: D²-MoE (Fisher-merged base + whitened low-rank deltas + semi-dynamic base pruning); "
                   "svd: plain per-expert SVD; whitened-svd: per-expert SVD-LLM; rs: RS-MoE (sparse dense units + "
                   "activation-aware low-rank units + ridge down base, MI layer budgets); mobe: MoBE (bases shared by "
                   "all experts, softmax mixing); rfid: RFID-MoE (frequency x effective-rank rank allocation over "
                   "expert groups + hashed residual)")
    c.add_argument("--ratio", type=_ratio, required=True,
                   help="fraction of TOTAL model parameters to remove, e.g. 0.6 (achieved within ±0.005)")
    g = c.add_argument_group("calibration")
    g.add_argument("--calib-file", type=Path, default=DEFAULT_CALIB_FILE,
                   help="UTF-8 text to calibrate on (default: a 200 kB Brown-corpus sample shipped with the package; "
                   "D²-MoE uses 512 samples of WikiText-2)")
    g.add_argument("--calib-samples", type=_positive, default=128, help="number of token windows (default 128)")
    g.add_argument("--calib-seqlen", type=_positive, default=512, help="tokens per window (default 512)")
    g.add_argument("--calib-batch-size", type=_positive, default=8, help="windows per forward pass (default 8)")
    g.add_argument("--seed", type=int, default=0, help="seed for window sampling, Fisher labels and RS-MoE's MINE (default 0)")
    g.add_argument("--expert-chunk", type=_positive, default=16,
                   help="experts whose Grams are in memory at once (default 16; any value gives the same result, "
                   "smaller needs less memory and more passes over the layer's calibration inputs)")
    g.add_argument("--fisher-samples", type=_positive, default=32,
                   help="calibration windows for D²-MoE's Fisher merge (--method d2 --merge fisher; default 32)")
    g.add_argument("--fisher-labels", choices=FISHER_LABELS, default="sampled",
                   help="labels for the Fisher gradients: sampled from the model (Eq. 4, default) or the true tokens")
    g.add_argument("--fisher-granularity", choices=FISHER_GRANULARITY, default="expert",
                   help="one Fisher scalar per expert and projection (default), or a full diagonal per weight")
    g.add_argument("--fisher-batch-size", type=_positive, default=None,
                   help=f"Fisher windows per forward and backward (default: as many as hold {FISHER_BATCH_TOKENS} tokens, at least 1; "
                   "the Fisher values do not depend on it, larger is faster and needs more memory)")
    add_method_flags(c)
    o = c.add_argument_group("output")
    o.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="dtype of the compressed factors (default bfloat16); other tensors keep theirs")
    o.add_argument("--max-shard-size", type=_positive, default=2048, metavar="MiB", help="safetensors shard size (default 2048 MiB)")
    o.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists (only once the new one is complete)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")
    r = c.add_argument_group("compute")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the calibration forward, the Grams and the SVD-based factorisations run (default auto: "
                   "cuda when torch.cuda.is_available(), else cpu; cuda without a visible GPU is refused). The output "
                   "does not record it; the Fisher pass, per-layer budgets, rs's ridge base and the mobe/rfid fits stay on the CPU")


def _add_eval_ppl(e: argparse.ArgumentParser) -> None:
    """perplexity of a dense or compressed checkpoint on a local dataset

    Perplexity over non-overlapping windows (GPTQ convention) of a local test text. Compressed checkpoints run
    through the pure-PyTorch reference forward.
    """
    _add_checkpoint_dir(e)
    e.add_argument("--dataset", choices=DATASETS, required=True, help="test text, read from the data directory")
    _add_data_dir(e)
    e.add_argument("--max-tokens", type=_positive, help="score only the first N tokens (whole windows)")
    e.add_argument("--seqlen", type=_positive, help="window length (default min(2048, model maximum))")
    e.add_argument("--batch-size", type=_positive, default=1,
                   help="windows per forward pass (default 1); with D²-MoE's dynamic pruning on, the batch is what "
                   "the pruning sees")
    e.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype (default float32)")
    e.add_argument("--dynamic-prune", action="store_true",
                   help="apply D²-MoE's per-batch dynamic base pruning, as the paper evaluates (default off, as vllm "
                   "serve runs it unless VLLM_MOE_COMPRESS_DYNAMIC_PRUNE=1)")
    e.add_argument("--json", action="store_true", help="print a JSON object as the last line of stdout")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_generate(t: argparse.ArgumentParser) -> None:
    """greedy text from a dense or compressed checkpoint (reference forward, no vLLM)

    A quick check that a checkpoint still speaks: greedy decoding through transformers, compressed experts computed
    by the pure-PyTorch reference forward.
    """
    _add_checkpoint_dir(t)
    t.add_argument("--prompt", required=True, metavar="TEXT", help="text to continue")
    t.add_argument("--max-new-tokens", type=_positive, default=32, help="tokens to generate (default 32)")


def _add_eval_zeroshot(z: argparse.ArgumentParser) -> None:
    """zero-shot accuracy (lm-evaluation-harness through vLLM) of a dense or compressed checkpoint

    lm-evaluation-harness, 0-shot, with its vLLM backend (quantization=moe_compress for compressed checkpoints).
    Tasks read the local copies in the data directory (offline/evaluation/eval_tasks/*.yaml swap only the data
    source of lm-eval's own task configurations); --tasks-source hub uses the standard tasks unchanged. vLLM on CPU
    needs VLLM_CPU_KVCACHE_SPACE (GiB; default here 1).
    """
    _add_checkpoint_dir(z)
    z.add_argument("--tasks", nargs="+", default=list(ZEROSHOT_TASKS), metavar="TASK",
                   help=f"lm-eval task names, space- or comma-separated (default: {','.join(ZEROSHOT_TASKS)})")
    z.add_argument("--limit", type=_positive, help="score only the first N documents of each task (default: all)")
    z.add_argument("--out", type=Path, required=True, metavar="FILE.json", help="where to write the results (JSON)")
    _add_task_data(z)
    z.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="vLLM compute dtype (default auto: the checkpoint's)")
    z.add_argument("--max-model-len", type=_positive, help="vLLM context length (default: the model's)")


def _add_report(r: argparse.ArgumentParser) -> None:
    """table (Markdown + JSON) and PNG plots for an original model and its compressed checkpoints

    One row per model: method, target/achieved ratio, parameters, bytes, perplexity per dataset, zero-shot accuracy
    per task; plots of routing frequency, rank/channel allocation and (with --original) singular-value energy of
    original, base and delta weights. Results come from --results files or are computed with --ppl-datasets /
    --zeroshot-tasks and cached in OUT_DIR/cache, so re-running after adding checkpoints evaluates only the new
    ones.
    """
    r.add_argument("dirs", nargs="*", metavar="DIR", help="compressed (or dense) checkpoint directories")
    r.add_argument("--out", type=Path, required=True, metavar="OUT_DIR", help="where report.md, report.json and PNGs go")
    r.add_argument("--original", type=Path, metavar="DIR",
                   help="the uncompressed model: first row of the table, and the original weights of the energy plot")
    r.add_argument("--results", type=Path, nargs="+", default=[], metavar="FILE",
                   help="JSON written by eval-zeroshot --out, or the JSON line of eval-ppl --json, per model")
    r.add_argument("--ppl-datasets", nargs="+", choices=DATASETS, default=[], metavar="DATASET",
                   help=f"compute perplexity on these ({', '.join(DATASETS)}) with the reference forward")
    r.add_argument("--ppl-max-tokens", type=_positive, default=40960, help="tokens scored per dataset (default 40960)")
    r.add_argument("--ppl-seqlen", type=_positive, help="perplexity window (default min(2048, model maximum))")
    r.add_argument("--zeroshot-tasks", nargs="+", default=[], metavar="TASK",
                   help="run eval-zeroshot on these tasks for every model (one subprocess each)")
    r.add_argument("--zeroshot-limit", type=_positive, help="first N documents per task for --zeroshot-tasks")
    _add_task_data(r)
    r.add_argument("--energy-layer", type=int, help="MoE layer of the energy plot (default: the first compressed)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_inspect(i: argparse.ArgumentParser) -> None:
    """method, ratios, per-layer ranks and parameter counts of a compressed checkpoint

    Check a compressed checkpoint as vllm serve does before starting its engine (a damaged one is refused with one
    line naming the tensor or field; --verify also reads the values), then summarise it: method and options, target
    and achieved ratios, parameter counts, per-layer base channels and rank statistics, calibration settings.
    """
    i.add_argument("model_dir", metavar="DIR", help="a directory written by moe-compress compress")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.add_argument("--verify", action="store_true",
                   help="also read every factor and refuse NaN/Inf (default: files, tensor names, shapes and dtypes "
                   "from the safetensors headers, format_version and schemes, as vllm serve checks at start-up)")


def run_compress(args) -> int:
    options = options_from_args(args.method, args)  # refuses another method's option before anything is read

    from .compress import CalibrationOptions, build_method, compress_checkpoint, resolve_device

    device = resolve_device(args.device)  # before anything is read or written
    method = build_method(args.method, options)
    calibration = CalibrationOptions(
        file=args.calib_file, samples=args.calib_samples, seqlen=args.calib_seqlen, seed=args.seed,
        batch_size=args.calib_batch_size, fisher_samples=args.fisher_samples, fisher_labels=args.fisher_labels,
        fisher_granularity=args.fisher_granularity, fisher_batch_size=args.fisher_batch_size,
    )
    info = compress_checkpoint(
        args.model_dir, args.output, method, args.ratio, calibration, dtype=args.dtype, overwrite=args.overwrite,
        max_shard_bytes=args.max_shard_size * 2**20, progress=not args.no_progress, expert_chunk=args.expert_chunk,
        device=device,
    )
    print(f"wrote {args.output}: {args.method}, {info.original_params:,} -> {info.compressed_params:,} parameters, "
          f"ratio {info.achieved_ratio:.4f} (target {info.target_ratio}), routed experts {info.expert_ratio:.4f}")
    return 0


def run_eval_ppl(args) -> int:
    from .evaluation.perplexity import checkpoint_perplexity

    result = checkpoint_perplexity(args.model_dir, [args.dataset], args.data_dir, args.max_tokens, args.seqlen,
                                   args.batch_size, args.dtype, args.dynamic_prune,
                                   not args.no_progress)[args.dataset]
    low, high = result.ppl_ci95
    forward = "dynamic pruning on" if args.dynamic_prune else "dynamic pruning off, as served"
    print(f"{args.model_dir} {args.dataset}: ppl {result.ppl:.4f} (95% CI {low:.4f}–{high:.4f}; mean NLL "
          f"{result.nll:.5f} ± {result.nll_se:.5f} SE over windows) over {result.tokens:,} tokens "
          f"({result.windows} windows of {result.seqlen}; reference forward, {forward})")
    if args.json:
        print(json.dumps({"model": str(args.model_dir), "dataset": args.dataset, **result.to_dict(),
                          "dynamic_pruning": args.dynamic_prune}))
    return 0


def _task_list(values: list[str]) -> tuple[str, ...]:
    return tuple(t for value in values for t in value.split(",") if t)


def run_eval_zeroshot(args) -> int:
    from .checkpoint_io import write_json
    from .evaluation.datasets import resolve_data_dir
    from .output_safety import check_result_file
    from .evaluation.zeroshot import ZeroShotOptions, evaluate_zeroshot

    check_result_file(args.out, "--out", "a previous eval-zeroshot result", lambda d: d.get("kind") == "zeroshot")
    data_dir = resolve_data_dir(args.data_dir) if args.tasks_source == "local" else None
    options = ZeroShotOptions(tasks=_task_list(args.tasks), limit=args.limit, source=args.tasks_source,
                              data_dir=data_dir, dtype=args.dtype, max_model_len=args.max_model_len)
    result = evaluate_zeroshot(args.model_dir, options)
    write_json(args.out, result)
    for task, metrics in result["tasks"].items():
        norm = f"  acc_norm {metrics['acc_norm']:.4f}" if "acc_norm" in metrics else ""
        print(f"{task:<14} acc {metrics['acc']:.4f}{norm}  ({metrics['samples']} of {metrics['samples_total']} docs)")
    print(f"wrote {args.out}")
    return 0


def run_report(args) -> int:
    from .evaluation.datasets import resolve_data_dir
    from .output_safety import OutputPathError, check_result_file
    from .evaluation.report import ReportOptions, build_report

    check_result_file(args.out / "report.json", "--out", "a previous report", lambda d: "rows" in d)
    if (args.out / "report.md").exists() and not (args.out / "report.json").exists():
        raise OutputPathError(f"{args.out} holds a report.md that moe-compress report did not write (no report.json): "
                              "choose another --out")
    needs_data = args.ppl_datasets or (args.zeroshot_tasks and args.tasks_source == "local")
    options = ReportOptions(
        out_dir=args.out, original=args.original, results=args.results, ppl_datasets=args.ppl_datasets,
        ppl_max_tokens=args.ppl_max_tokens, ppl_seqlen=args.ppl_seqlen,
        data_dir=resolve_data_dir(args.data_dir) if needs_data else None,
        zeroshot_tasks=list(_task_list(args.zeroshot_tasks)), zeroshot_limit=args.zeroshot_limit,
        tasks_source=args.tasks_source, energy_layer=args.energy_layer, progress=not args.no_progress,
    )
    rows = build_report([Path(d) for d in args.dirs], options)
    print((args.out / "report.md").read_text(), end="")
    plots = sum(1 for r in rows for k in r.plots if k != "energy_layer")
    print(f"wrote {args.out}/report.md, report.json and {plots} plots")
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
    from .checkpoint_check import check_checkpoint
    from .summary import format_summary, summarize

    check_checkpoint(args.model_dir, values=args.verify)
    summary = {**summarize(args.model_dir), "checked": "headers and values" if args.verify else "headers"}
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


COMMANDS = {"compress": (_add_compress, run_compress), "eval-ppl": (_add_eval_ppl, run_eval_ppl),
            "generate": (_add_generate, run_generate), "eval-zeroshot": (_add_eval_zeroshot, run_eval_zeroshot),
            "report": (_add_report, run_report), "inspect": (_add_inspect, run_inspect)}
"""Sub-command -> (the function that adds its arguments, whose docstring is its help and description; the function
that runs it)."""


def _command_of(argv: list[str]) -> str | None:
    """The sub-command: the first word that is not an option (moe-compress's own options take no value)."""
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Only the sub-command's arguments are built, so that nothing but compress imports the method modules (and torch).
    args = build_parser(commands=[_command_of(argv)]).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return COMMANDS[args.command][1](args)
    except user_errors() as err:
        print(f"moe-compress {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # permission denied, read-only file system, a file where a directory should be...
        message = f"{err.strerror}: {err.filename}" if err.strerror and err.filename else str(err)
        print(f"moe-compress {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"moe-compress {args.command}: interrupted{': ' + str(err) if str(err) else ''}", file=sys.stderr)
        return 130


# Commands that run vLLM's engine inside this process (lm-eval's vLLM backend): entry() ends them without the
# interpreter's finalisation.
IN_PROCESS_ENGINE_COMMANDS = frozenset({"eval-zeroshot"})


def entry() -> None:
    """The ``moe-compress`` command and ``python -m vllm_moe_compress.offline.cli``: ``main``, then exit with its code.

    After eval-zeroshot the process ends with ``os._exit`` once the streams are flushed: vLLM's engine client leaves
    native threads in this process whose destruction during the interpreter's finalisation aborted complete runs
    (SIGABRT, "terminate called without an active exception", after "wrote OUT": once in CI, 1 of 15 runs in a
    loop here; 0 of 30 with this exit), so a caller saw a failed command whose result was written. Finalisation
    has nothing left to do for it: the result is written atomically and the engine's own process is shut down
    (evaluation/zeroshot.py)."""
    argv = sys.argv[1:]
    if _command_of(argv) not in IN_PROCESS_ENGINE_COMMANDS:
        sys.exit(main(argv))
    try:
        code = main(argv)
    except Exception:  # a failure main does not turn into one line: its traceback, exit status 1, as Python's own
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    entry()
