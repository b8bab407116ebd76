"""Shared fixtures: a tiny randomly initialised Llama with a locally trained tokenizer (no hub)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # the Triton kernels' tests run under Triton's interpreter (before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")
if "SAEFLOW_CACHE_DIR" not in os.environ:  # model outlines (storage/model_outline.py) cached per test session
    import tempfile

    os.environ["SAEFLOW_CACHE_DIR"] = tempfile.mkdtemp(prefix="saeflow-cache-")

SENTENCES = [
    "Return the sum of two numbers.",
    "Open the file and read every line into a list.",
    "The parser raises ValueError when the input is malformed.",
    "Sparse autoencoders decompose activations into interpretable features.",
    "A context manager closes the socket when the block exits.",
    "Iterate over the keys of the mapping in sorted order.",
]


def corpus_texts(n_docs: int = 60) -> list[str]:
    g = torch.Generator().manual_seed(0)
    docs = []
    for i in range(n_docs):
        picks = torch.randint(len(SENTENCES), (12,), generator=g).tolist()
        docs.append(f"Document {i}. " + " ".join(SENTENCES[j] for j in picks))
    return docs


def build_tiny_model(directory: Path, hidden: int = 32, layers: int = 3) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(corpus_texts() + SENTENCES, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(
        vocab_size=fast.vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("texts")
    for i, text in enumerate(corpus_texts()):
        (d / f"doc{i:03d}.txt").write_text(text)
    return d


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(home / "results")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


from server_fixtures import dask_scheduler, mlflow_server, postgres, prefect_server, s3_server  # noqa: E402,F401
