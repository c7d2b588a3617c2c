"""The names the command line offers for each choice option, torch-free so that building the parser (and
``moe-compress --help``) imports neither torch nor transformers; the methods' options dataclasses (in the method
modules, which import torch) take their choices from here too.

Modules that check a value against these names import them from here, so each list exists once; the table
keyed by activation name (``offline.methods.basis_fit.ACTIVATIONS``) is checked against these names by
tests/test_cli_help.py. Method names are the keys of ``offline.methods.METHODS``.
"""

MERGES = ("fisher", "mean", "frequency")
FISHER_LABELS = ("sampled", "empirical")
FISHER_GRANULARITY = ("expert", "element")
FISHER_BATCH_TOKENS = 1024
"""Tokens per batch of D²-MoE's Fisher pass by default (offline/fisher.py: fisher_batch_size; here, torch-free,
for ``--fisher-batch-size``'s help)."""
ALLOCATIONS = ("mi", "uniform", "reverse")
ACTIVATION_NAMES = ("silu", "tanh", "identity")
EFFECTIVE_RANK_MODES = ("energy", "singular")
RS_SCORES = ("aci", "weight", "activation", "peak")
RS_BASES = ("ridge", "mean", "frequency", "none")
RS_LOWRANK_SVDS = ("activation", "plain")
ZEROSHOT_TASKS = (  # the papers' zero-shot suite, as lm-eval task names
    "arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "openbookqa", "mathqa", "boolq")
TASK_SOURCES = ("local", "hub")
