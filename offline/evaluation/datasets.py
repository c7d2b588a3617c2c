"""Local evaluation text for perplexity (no hub, no `datasets` library).

The files live under a data directory laid out as `shared/data` (see its SOURCES.md):
`wikitext2/wiki.test.raw`, `ptb/ptb.test.txt`, `c4/c4_en_validation_subset_2k.jsonl.gz`,
`brown/test.txt`. Pass it as `--data-dir` or set `MOE_COMPRESS_DATA`.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

DATASETS = ("wikitext2", "ptb", "c4", "brown")

DATA_ENV = "MOE_COMPRESS_DATA"
C4_DOCS = 1100

_FILES = {
    "wikitext2": "wikitext2/wiki.test.raw",
    "ptb": "ptb/ptb.test.txt",
    "c4": "c4/c4_en_validation_subset_2k.jsonl.gz",
    "brown": "brown/test.txt",
}


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """Return `data_dir`, else `$MOE_COMPRESS_DATA`; raise if unset or not a directory."""
    raw = data_dir if data_dir is not None else os.environ.get(DATA_ENV)
    if not raw:
        raise FileNotFoundError(
            f"no evaluation data directory: pass --data-dir or set {DATA_ENV} "
            "(e.g. the shared/data directory that holds wikitext2/, ptb/, c4/, brown/)"
        )
    path = Path(raw).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"evaluation data directory {str(path)!r} does not exist "
            f"(from --data-dir or {DATA_ENV})"
        )
    return path


def _wikitext2(path: Path) -> str:
    # HF `wikitext-2-raw-v1` rows are the lines of wiki.test.raw with their trailing "\n" kept,
    # and whitespace-only lines (" \n" in the file) replaced by "" (the HF builder does exactly this).
    with open(path, encoding="utf-8") as f:
        rows = [line if line.strip() else "" for line in f]
    return "\n\n".join(rows)


def _ptb(path: Path) -> str:
    with open(path, encoding="utf-8") as f:
        return "\n\n".join(line.strip() for line in f)


def _c4(path: Path) -> str:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line, _ in zip(f, range(C4_DOCS))]
    return " ".join(docs)


def _brown(path: Path) -> str:
    return path.read_text(encoding="utf-8")


_READERS = {"wikitext2": _wikitext2, "ptb": _ptb, "c4": _c4, "brown": _brown}


def load_eval_text(name: str, data_dir: str | os.PathLike | None) -> str:
    """The test text of `name`, joined as GPTQ / SVD-LLM do before tokenizing it once.

    - wikitext2: HF `wikitext-2-raw-v1` test rows rebuilt from `wiki.test.raw` (each line keeps its
      trailing "\\n", blank lines become ""), joined with "\\n\\n" (GPTQ `get_wikitext2`). The text
      therefore starts "\\n\\n = Robert Boulter = \\n\\n\\n\\n Robert Boulter is ...".
    - ptb: `ptb_text_only` test sentences (`line.strip()` of each line), joined with "\\n\\n"
      (SVD-LLM test split; GPTQ's `get_ptb` uses the same join on the validation split).
    - c4: the first 1100 documents' `text`, joined with " " (GPTQ `valdata[:1100]`; GPTQ then keeps
      256 * seqlen tokens, use `max_tokens` for that). This 2k-document subset is NOT verified to
      be the prefix of the canonical `en/c4-validation.00000-of-00008.json.gz`, so its numbers
      are not directly comparable with published C4 perplexities.
    - brown: `brown/test.txt` as is (in-domain text of the reference models).
    """
    if name not in _READERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    path = resolve_data_dir(data_dir) / _FILES[name]
    if not path.is_file():
        raise FileNotFoundError(f"{name} evaluation file not found: {path}")
    return _READERS[name](path)
