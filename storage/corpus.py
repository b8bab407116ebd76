"""Text sources, the held-out split by document, and packing tokens into fixed-length contexts."""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PYTHON_DOCS = "builtin:python-docs"
HF_PREFIX = "hf:"
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
_SKIPPED_STDLIB_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def _python_docs() -> Iterator[tuple[str, str]]:
    """The installed Python's standard-library docstrings, one document per module, sorted by path.

    Deterministic for a given Python build, needs no network, and parses (never imports) the files.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIPPED_STDLIB_DIRS & set(rel.parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree] + [
            n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        docs = [d for d in (ast.get_docstring(n) for n in nodes) if d and len(d) > 20]
        if docs:
            yield str(rel), "\n\n".join(docs)


def resolve_files(source: str) -> list[Path]:
    """The local files a source names (a file, a directory or a glob), sorted; errors name the source."""
    path = Path(source)
    if path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if p.suffix in TEXT_SUFFIXES]
    elif any(ch in source for ch in "*?["):
        files = [Path(p) for p in sorted(glob.glob(source, recursive=True))]
    else:
        files = [path]
    if not files:
        raise FileNotFoundError(f"{source!r} matches no .txt/.jsonl/.parquet file")
    for f in files:
        if f.suffix not in TEXT_SUFFIXES:
            raise ValueError(f"file {f} must end in one of {', '.join(TEXT_SUFFIXES)}")
        if not f.is_file():
            raise FileNotFoundError(f"file {f} does not exist or is not a readable file")
        with open(f, "rb"):
            pass
    return files


def _file_documents(files: list[Path]) -> Iterator[tuple[str, str]]:
    for f in files:
        if f.suffix == ".txt":
            yield str(f), f.read_text(encoding="utf-8")
        elif f.suffix == ".jsonl":
            with open(f, encoding="utf-8") as lines:
                for i, line in enumerate(lines):
                    if line.strip():
                        yield f"{f}:{i}", json.loads(line)["text"]
        else:
            import pyarrow.parquet as pq

            for i, text in enumerate(pq.read_table(f, columns=["text"]).column("text").to_pylist()):
                yield f"{f}:{i}", text


def _hf_documents(name: str) -> Iterator[tuple[str, str]]:
    try:
        import datasets  # pyright: ignore[reportMissingImports]  (optional: hf: sources only)
    except ImportError as e:
        raise ImportError(f"data.source {HF_PREFIX}{name} needs the `datasets` package") from e
    for i, row in enumerate(datasets.load_dataset(name, split="train", streaming=True)):
        yield f"{name}:{i}", row["text"]


def documents(source: str) -> Iterator[tuple[str, str]]:
    """(document id, text) pairs of a data source, in a deterministic order."""
    if source == PYTHON_DOCS:
        return _python_docs()
    if source.startswith(HF_PREFIX):
        return _hf_documents(source[len(HF_PREFIX) :])
    return _file_documents(resolve_files(source))


def corpus_tokens(source: str, tokenizer) -> int | None:
    """Tokens in the whole source as the cache stage packs them (each document and an EOS); None for a
    hub dataset, which is not read to count it."""
    if source.startswith(HF_PREFIX):
        return None
    eos = int(tokenizer.eos_token_id is not None)
    return sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) + eos for _, text in documents(source))


def is_heldout(doc_id: str, eval_fraction: float) -> bool:
    """A stable split by document: the same document is always on the same side."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big")
    return h / 2**64 < eval_fraction


@dataclass
class Contexts:
    """Fixed-length contexts and, for every token, which document it came from and where."""

    tokens: np.ndarray  # (n, L) int32 token ids
    doc_index: np.ndarray  # (n, L) int32 index into `documents`
    doc_position: np.ndarray  # (n, L) int32 offset of the token inside its document
    documents: list[str]  # document ids


class _Packer:
    def __init__(self, need: int):
        self.need = need
        self.tokens: list[int] = []
        self.doc_index: list[int] = []
        self.doc_position: list[int] = []
        self.documents: list[str] = []

    @property
    def full(self) -> bool:
        return len(self.tokens) >= self.need

    def add(self, doc_id: str, ids: list[int]) -> None:
        index = len(self.documents)
        self.documents.append(doc_id)
        self.tokens.extend(ids)
        self.doc_index.extend([index] * len(ids))
        self.doc_position.extend(range(len(ids)))

    def contexts(self, context_length: int) -> Contexts:
        def cut(values):
            return np.asarray(values[: self.need], dtype=np.int32).reshape(-1, context_length)

        used = int(self.doc_index[self.need - 1]) + 1
        return Contexts(cut(self.tokens), cut(self.doc_index), cut(self.doc_position), self.documents[:used])


def split_contexts(
    source: str, tokenizer, context_length: int, n_train: int, n_eval: int, eval_fraction: float
) -> tuple[Contexts, Contexts]:
    """(train, eval) contexts from one pass over the source, split by document (`is_heldout`).

    Each document is followed by EOS; a split's documents are concatenated and cut into contexts;
    the pass stops as soon as both splits have enough tokens.
    """
    packers = {False: _Packer(n_train * context_length), True: _Packer(n_eval * context_length)}
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for doc_id, text in documents(source):
        packer = packers[is_heldout(doc_id, eval_fraction)]
        if packer.full:
            if all(p.full for p in packers.values()):
                break
            continue
        packer.add(doc_id, tokenizer(text, add_special_tokens=False)["input_ids"] + eos)
    for side, name in ((False, "train (data.tokens)"), (True, "held-out (eval.tokens)")):
        if not packers[side].full:
            raise ValueError(
                f"data.source {source!r} has {len(packers[side].tokens)} tokens for the {name} split, fewer than "
                f"the {packers[side].need} asked for: lower the number or add data"
            )
    return packers[False].contexts(context_length), packers[True].contexts(context_length)
