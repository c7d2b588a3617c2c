"""Evaluation and reporting of checkpoints, dense or compressed (docs/evaluation.md): perplexity through the
reference forward (``perplexity``, ``datasets``), zero-shot accuracy through lm-eval + vLLM (``zeroshot``,
``eval_tasks/``), and the report's table and plots (``report``, ``plots``, ``spectrum``). Nothing in the
compression pipeline (calibrate → method → pack → write) imports this package."""
