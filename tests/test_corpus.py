import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.corpus import PYTHON_DOCS, documents, is_heldout, resolve_files, split_contexts


def test_local_sources_read_text_fields(tmp_path):
    (tmp_path / "a.txt").write_text("plain text file")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    pq.write_table(pa.table({"text": ["p0", "p1"], "other": [1, 2]}), tmp_path / "c.parquet")
    docs = list(documents(str(tmp_path)))
    assert [t for _, t in docs] == ["plain text file", "first", "second", "p0", "p1"]
    assert docs[1][0].endswith("b.jsonl:0") and docs[4][0].endswith("c.parquet:1")
    assert [f.name for f in resolve_files(str(tmp_path / "*.jsonl"))] == ["b.jsonl"]


def test_python_docs_is_deterministic_and_offline():
    first = [d for _, d in zip(range(30), documents(PYTHON_DOCS))]
    again = [d for _, d in zip(range(30), documents(PYTHON_DOCS))]
    assert first == again and all(len(text) > 20 for _, text in first)
    assert not any("/test/" in f"/{doc_id}" for doc_id, _ in first)


def test_heldout_split_is_stable_and_about_the_fraction():
    ids = [f"doc-{i}" for i in range(4000)]
    held = [i for i in ids if is_heldout(i, 0.25)]
    assert held == [i for i in ids if is_heldout(i, 0.25)]
    assert 0.22 < len(held) / len(ids) < 0.28


def test_contexts_trace_back_to_their_documents(tiny_model_dir, text_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    train, heldout = split_contexts(str(text_dir), tok, 16, 20, 10, 0.3)
    assert train.tokens.shape == (20, 16) and heldout.tokens.shape == (10, 16)
    assert not set(train.documents) & set(heldout.documents)
    texts = dict(documents(str(text_dir)))
    for ctx in (train, heldout):
        for c, p in [(0, 0), (3, 7), (ctx.tokens.shape[0] - 1, 15)]:
            doc = ctx.documents[ctx.doc_index[c, p]]
            ids = tok(texts[doc], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            assert ids[ctx.doc_position[c, p]] == ctx.tokens[c, p]


def test_too_little_data_names_the_setting(tiny_model_dir, text_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match=r"held-out \(eval.tokens\) split"):
        split_contexts(str(text_dir), tok, 16, 2, 10**6, 0.3)
