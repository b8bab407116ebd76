"""A corpus of malformed specs, one defect each, across every field and cross-field rule: each must
make `saeflow validate` exit 2 with one line naming the field (and how to fix it), before any model
is loaded."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import yaml

from flows.cli import main

DELETE = object()


def base(model_dir, text_dir, workdir) -> dict:
    return {
        "name": "tiny",
        "model": {"source": str(model_dir), "dtype": "auto", "device": "auto"},
        "data": {"source": str(text_dir), "context_length": 16, "tokens": 1500},
        "hookpoints": ["model.layers.1"],
        "sae": {"n_latents": 64, "k": 4},
        "train": {"batch_tokens": 128},
        "eval": {"tokens": 300},
        "registry": {"alias": "candidate"},
        "orchestration": {},
        "workdir": str(workdir),
    }


# (where, value, what the message must contain); `where` is a dotted path into the spec
CASES = [
    ("name", DELETE, "name"),
    ("name", "", "name"),
    ("name", "bad name!", "name"),
    ("name", ["a"], "name"),
    ("model.source", "no-such-org/no-such-model", "model.source"),
    ("model.source", "", "model.source"),
    ("model.dtype", "fp8", "model.dtype"),
    ("model.device", "gpu", "model.device"),
    ("model.device", "cuda:x", "model.device"),
    ("model.revisionx", "main", "model.revisionx"),
    ("data.source", "/no/such/dir/at/all", "data.source"),
    ("data.context_length", 0, "data.context_length"),
    ("data.context_length", -5, "data.context_length"),
    ("data.context_length", 1, "data.context_length"),
    ("data.tokens", 0, "data.tokens"),
    ("data.tokens", "many", "data.tokens"),
    ("data.tokens", 10, "data.tokens"),
    ("data.eval_fraction", 0, "data.eval_fraction"),
    ("data.eval_fraction", 1, "data.eval_fraction"),
    ("data.eval_fraction", 1.5, "data.eval_fraction"),
    ("data.batch_contexts", 0, "data.batch_contexts"),
    ("data.store", "notaproto://bucket/acts", "data.store"),
    ("data.dtype", "int8", "data.dtype"),
    ("data.shard_contexts", 0, "data.shard_contexts"),
    ("data.compression", "gzip", "data.compression"),
    ("data.drop_first_position", "maybe", "data.drop_first_position"),
    ("data.store_options", "key=value", "data.store_options"),
    ("data.foo", 1, "data.foo"),
    ("hookpoints", DELETE, "hookpoints"),
    ("hookpoints", [], "hookpoints"),
    ("hookpoints", "model.layers.1", "hookpoints"),
    ("hookpoints", ["model.layers.99"], "hookpoints.0"),
    ("hookpoints", ["model.layers.1", "model.layers.1"], "hookpoints"),
    ("hookpoints", [["model.layers.1"]], "hookpoints.0"),
    ("sae", DELETE, "sae"),
    ("sae", [], "sae"),
    ("sae", {"k": 4}, "sae"),
    ("sae", {"n_latents": 64, "expansion_factor": 2, "k": 4}, "sae"),
    ("sae.n_latents", 0, "sae.n_latents"),
    ("sae.n_latents", -1, "sae.n_latents"),
    ("sae.n_latents", 10**12, "sae.n_latents"),
    ("sae.n_latents", "big", "sae.n_latents"),
    ("sae.k", 0, "sae.k"),
    ("sae.k", 65, "sae"),
    ("sae", {"expansion_factor": 0, "k": 4}, "sae.expansion_factor"),
    ("sae", {"expansion_factor": 1, "k": 40}, "sae.k"),
    ("sae.aux_k", 0, "sae.aux_k"),
    ("sae.dead_tokens", 0, "sae.dead_tokens"),
    ("sae.normalization", "l2", "sae.normalization"),
    ("sae.activation", "relu", "sae.activation"),
    ("sae", {"n_latents": 64, "k": 4, "multi_topk": True, "activation": "batchtopk"}, "sae.multi_topk"),
    ("sae.encoder_bias", "yes please", "sae.encoder_bias"),
    ("sae.foo", 1, "sae.foo"),
    ("sae", [{"n_latents": 64, "k": 4}, {"n_latents": 64, "k": 4}], "sae"),
    ("train.readers", 4096, "train.readers"),
    ("train.readers", 0, "train.readers"),
    ("train.shuffle_buffer_mb", 0, "train.shuffle_buffer_mb"),
    ("train.batch_tokens", 0, "train.batch_tokens"),
    ("train.lr", -1, "train.lr"),
    ("train.lr", 0, "train.lr"),
    ("train.lr", float("inf"), "train.lr"),
    ("train.lr", float("nan"), "train.lr"),
    ("train.lr", "fast", "train.lr"),
    ("train.tokens", 0, "train.tokens"),
    ("train.tokens", 10, "train.tokens"),
    ("train.lr_warmup_tokens", -1, "train.lr_warmup_tokens"),
    ("train.lr_warmup_tokens", 5000, "train.lr_warmup_tokens"),
    ("train.lr_decay", "exp", "train.lr_decay"),
    ("train.recipe", "fancy", "train.recipe"),
    ("train.optimizer", "sgd", "train.optimizer"),
    ("train.grad_clip", 0, "train.grad_clip"),
    ("train.grad_clip", -1, "train.grad_clip"),
    ("train.ema_decay", 1, "train.ema_decay"),
    ("train.ema_decay", 0, "train.ema_decay"),
    ("train.checkpoint_every_tokens", -1, "train.checkpoint_every_tokens"),
    ("train.seed", -1, "train.seed"),
    ("train.device", "gpu", "train.device"),
    ("train.precision", "fp8", "train.precision"),
    ("train.epochs", 2, "train.epochs"),
    ("train", {"batch_tokens": 128, "devices": 2, "latent_shards": 3}, "train.latent_shards"),
    ("train", {"batch_tokens": 127, "devices": 2}, "train.batch_tokens"),
    ("train.devices", 0, "train.devices"),
    ("train", {"batch_tokens": 128, "nodes": 2}, "train.rdzv_endpoint"),
    ("train", {"batch_tokens": 128, "nodes": 2, "rdzv_endpoint": "node0"}, "train.rdzv_endpoint"),
    (
        "train",
        {"batch_tokens": 128, "devices": 2, "latent_shards": 2, "sae_placement": "spread"},
        "train.sae_placement",
    ),
    ("train", {"batch_tokens": 128, "devices": 2, "sae_placement": "spread"}, "train.sae_placement"),
    ("train", {"batch_tokens": 128, "devices": 3, "latent_shards": 3}, "train.latent_shards=3"),  # 64 latents in 3
    ("train.device_memory_gib", 0, "train.device_memory_gib"),
    ("eval.tokens", 0, "eval.tokens"),
    ("eval.downstream_contexts", -1, "eval.downstream_contexts"),
    ("eval.batch_contexts", 0, "eval.batch_contexts"),
    ("eval.feature_tokens", 0, "eval.feature_tokens"),
    ("eval.ablation_contexts", -1, "eval.ablation_contexts"),
    ("eval.foo", 1, "eval.foo"),
    ("registry.alias", "v1", "registry.alias"),
    ("registry.alias", "V12", "registry.alias"),
    ("registry.alias", "latest", "registry.alias"),
    ("registry.alias", "", "registry.alias"),
    ("registry.alias", "has space", "registry.alias"),
    ("registry.model_name", "a/b", "registry.model_name"),
    ("registry.model_name", "has space", "registry.model_name"),
    ("registry.tracking_uri", "htp:/nowhere", "registry.tracking_uri"),
    ("registry.tracking_uri", "http://", "registry.tracking_uri"),
    ("registry.tracking_uri", "ftp://host/x", "registry.tracking_uri"),
    ("registry.foo", 1, "registry.foo"),
    ("orchestration.dask_address", "not a url", "orchestration.dask_address"),
    ("orchestration.dask_address", "tcp://", "orchestration.dask_address"),
    ("orchestration.dask_workers", -1, "orchestration.dask_workers"),
    ("orchestration.foo", 1, "orchestration.foo"),
    ("trainer", {"lr": 1}, "trainer"),
    ("workdir", "/proc/saeflow-work", "workdir"),
]
if importlib.util.find_spec("s3fs") is None:
    CASES.append(("data.store", "s3://bucket/acts", "data.store"))
if importlib.util.find_spec("gcsfs") is None:
    CASES.append(("data.store", "gs://bucket/acts", "data.store"))

RAW = [  # (bytes after a valid spec, or a whole file, what the message says)
    (b"name: other\n", "given twice"),
    (b"# caf\xe9\n", "not UTF-8"),
    (b"extra: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    (b"extra: [unclosed\n", "not valid YAML"),
    (b"laughs: &a [*a, *a]\n", "laughs: unknown key"),  # a self-referencing alias: refused, not expanded
    (None, "must hold a mapping"),
]


def put(spec: dict, where: str, value) -> dict:
    spec = copy.deepcopy(spec)
    *parents, last = where.split(".")
    node = spec
    for key in parents:
        node = node.setdefault(key, {})
    if value is DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return spec


@pytest.fixture
def no_model_loading(monkeypatch):
    import sae.lm

    def refuse(*_a, **_k):
        raise AssertionError("validation loaded a model")

    monkeypatch.setattr(sae.lm, "load_lm", refuse)


def validate(path, capsys) -> tuple[int, list[str]]:
    code = main(["validate", str(path)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.strip().splitlines()


def test_the_base_spec_is_valid(tiny_model_dir, text_dir, tmp_path, capsys, no_model_loading):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(base(tiny_model_dir, text_dir, tmp_path / "work")))
    assert validate(path, capsys) == (0, [])


def test_the_corpus_has_80_defects():
    assert len(CASES) + len(RAW) >= 80


@pytest.mark.parametrize("where, value, field", CASES, ids=[f"{w}={v!r}"[:60] for w, v, _ in CASES])
def test_malformed_spec_is_one_line_naming_the_field(
    tiny_model_dir, text_dir, tmp_path, capsys, no_model_loading, where, value, field
):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(put(base(tiny_model_dir, text_dir, tmp_path / "work"), where, value)))
    code, lines = validate(path, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert f" {field}" in lines[0] or f" {field}:" in lines[0] or f"{field}." in lines[0], lines[0]
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("raw, message", RAW, ids=[(r or b"list")[:20].decode("latin-1") for r, _ in RAW])
def test_malformed_file_is_one_line(tiny_model_dir, text_dir, tmp_path, capsys, no_model_loading, raw, message):
    path = tmp_path / "spec.yaml"
    valid = yaml.safe_dump(base(tiny_model_dir, text_dir, tmp_path / "work")).encode()
    path.write_bytes(valid + raw if raw is not None else b"- a\n- b\n")
    code, lines = validate(path, capsys)
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
