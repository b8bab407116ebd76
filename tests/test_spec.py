import subprocess
import sys

import pytest
import yaml

from flows.cli import main
from flows.spec import SpecError, load_spec, parse_spec


def base(tiny_model_dir, text_dir, tmp_path, **over):
    spec = {
        "name": "t",
        "model": {"source": str(tiny_model_dir)},
        "data": {"source": str(text_dir), "context_length": 16, "tokens": 1000},
        "hookpoints": ["model.layers.1"],
        "sae": {"n_latents": 64, "k": 4},
        "train": {"batch_tokens": 256},
        "workdir": str(tmp_path / "work"),
    }
    for dotted, value in over.items():
        *parents, leaf = dotted.split("__")
        node = spec
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return spec


def write(tmp_path, spec) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def error_of(tmp_path, spec) -> str:
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, spec))
    return str(e.value)


def test_valid_spec_resolves_defaults(tiny_model_dir, text_dir, tmp_path):
    spec = load_spec(write(tmp_path, base(tiny_model_dir, text_dir, tmp_path)))
    assert spec.registry.alias == "candidate"
    assert spec.tracking_uri() == f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}"
    assert spec.sae_config(32).n_latents == 64


def test_unknown_key_is_named(tiny_model_dir, text_dir, tmp_path):
    msg = error_of(tmp_path, base(tiny_model_dir, text_dir, tmp_path, train__learning_rate=1e-3))
    assert "train.learning_rate" in msg and "unknown key" in msg


def test_k_larger_than_latents(tiny_model_dir, text_dir, tmp_path):
    msg = error_of(tmp_path, base(tiny_model_dir, text_dir, tmp_path, sae__k=65))
    assert "sae" in msg and "k=65" in msg and "n_latents=64" in msg


def test_k_larger_than_expansion(tiny_model_dir, text_dir, tmp_path):
    spec = base(tiny_model_dir, text_dir, tmp_path)
    spec["sae"] = {"expansion_factor": 2, "k": 65}  # 2 x d_model 32 = 64 latents
    assert "sae.k=65 exceeds n_latents=64" in error_of(tmp_path, spec)


@pytest.mark.parametrize("field", ["data__tokens", "train__batch_tokens", "sae__n_latents", "data__context_length"])
def test_negative_sizes(tiny_model_dir, text_dir, tmp_path, field):
    msg = error_of(tmp_path, base(tiny_model_dir, text_dir, tmp_path, **{field: -5}))
    assert field.replace("__", ".") in msg and "greater than 0" in msg


def test_hookpoint_not_in_model(tiny_model_dir, text_dir, tmp_path):
    msg = error_of(tmp_path, base(tiny_model_dir, text_dir, tmp_path, hookpoints=["model.layers.7"]))
    assert "hookpoints.0" in msg and "model.layers.7" in msg and "model.layers.0" in msg


def test_unreadable_data_path(tiny_model_dir, tmp_path):
    msg = error_of(tmp_path, base(tiny_model_dir, tmp_path / "missing.txt", tmp_path))
    assert msg.startswith("data.source") and "missing.txt" in msg


def test_wrong_data_suffix(tiny_model_dir, tmp_path):
    bad = tmp_path / "data.csv"
    bad.write_text("a,b")
    assert "must end in one of .txt, .jsonl, .parquet" in error_of(tmp_path, base(tiny_model_dir, bad, tmp_path))


def test_needs_exactly_one_size():
    with pytest.raises(SpecError, match="exactly one of sae.n_latents and sae.expansion_factor"):
        parse_spec({"name": "x", "hookpoints": ["a"], "sae": {"k": 4}})


def test_validate_cli_exit_codes(tiny_model_dir, text_dir, tmp_path, capsys):
    good = write(tmp_path, base(tiny_model_dir, text_dir, tmp_path))
    assert main(["validate", good]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"saeflow validate: {good} is valid: ")
    bad = write(tmp_path, base(tiny_model_dir, text_dir, tmp_path, sae__k=100))
    assert main(["validate", bad]) == 2
    assert "sae" in capsys.readouterr().err


def test_validate_as_a_command(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: x\nhookpoints: [a]\nsae: {n_latents: 8, k: 4}\nbogus: 1\n")
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "bogus: unknown key" in proc.stderr


def test_several_saes_are_named_by_index_and_size(tiny_model_dir, text_dir, tmp_path):
    spec = base(tiny_model_dir, text_dir, tmp_path)
    spec["sae"] = [{"n_latents": 64, "k": 4}, {"expansion_factor": 1, "k": 40}]  # 1 x d_model 32 = 32 latents
    assert "sae.1.k=40 exceeds n_latents=32" in error_of(tmp_path, spec)
    spec["sae"][1]["k"] = 8
    ok = load_spec(write(tmp_path, spec))
    assert [ok.model_name("model.layers.1", i) for i in range(2)] == ["t-n64-k4", "t-x1-k8"]
    assert ok.part_hash("sae.0") != ok.part_hash("sae.1")
    assert ok.sae_config(32, 1).n_latents == 32 and ok.train_config(100, "cpu", 1).tokens == 100


@pytest.mark.parametrize(
    "over, says",
    [
        ({"train__device": "cpu"}, "device cpu"),
        ({"train__devices": 2}, "several processes"),
        ({"train__optimizer": "adam"}, "optimizer adam"),
        ({"train__recipe": "paper"}, "optimizer adam"),
        ({"sae__activation": "batchtopk"}, "batchtopk"),
    ],
)
def test_a_cuda_graph_is_refused_where_the_step_cannot_be_captured(tiny_model_dir, text_dir, tmp_path, over, says):
    msg = error_of(tmp_path, base(tiny_model_dir, text_dir, tmp_path, train__cuda_graph=True, **over))
    assert msg.startswith("train.cuda_graph: not with") and says in msg and "set it to false" in msg, msg


def test_a_cuda_graph_does_not_change_what_the_train_stage_computes(tiny_model_dir, text_dir, tmp_path):
    """It changes how the step runs, not its result: the SAE's hash (and so its cache) stays."""
    plain = parse_spec(base(tiny_model_dir, text_dir, tmp_path, train__device="cuda"))
    graphed = parse_spec(base(tiny_model_dir, text_dir, tmp_path, train__device="cuda", train__cuda_graph=True))
    assert graphed.train_config(1000, "cuda").cuda_graph and plain.train_config(1000, "cuda").cuda_graph is None
    assert graphed.part_hash("train", "sae") == plain.part_hash("train", "sae")


@pytest.mark.parametrize(
    "over, says",
    [
        ({"train__device": "cpu"}, "device cpu (CUDA only)"),
        ({"train__device": "cuda", "train__precision": "fp32"}, "precision fp32"),
        ({"train__device": "cuda", "train__triton": False}, "triton false"),
        ({"train__device": "cuda", "sae__n_latents": 256, "sae__k": 65}, "k 65 (at most 64)"),
    ],
)
def test_the_fused_topk_kernel_is_refused_where_it_cannot_run(tiny_model_dir, text_dir, tmp_path, over, says):
    msg = error_of(tmp_path, base(tiny_model_dir, text_dir, tmp_path, train__fused_topk=True, **over))
    assert msg.startswith("train.fused_topk: not with") and says in msg and "set it to false" in msg, msg


def test_kernel_choices_key_the_train_stage_only_when_set(tiny_model_dir, text_dir, tmp_path):
    """They change a trained SAE's bits, so a set one keys the stage; at their defaults the keys of
    specs written before they were options stay as they were."""
    plain = parse_spec(base(tiny_model_dir, text_dir, tmp_path))
    defaults = parse_spec(
        base(tiny_model_dir, text_dir, tmp_path, train__device="cuda", train__triton=True, train__fused_topk=False)
    )
    reference = parse_spec(base(tiny_model_dir, text_dir, tmp_path, train__device="cuda", train__triton=False))
    fused = parse_spec(base(tiny_model_dir, text_dir, tmp_path, train__device="cuda", train__fused_topk=True))
    on_cuda = parse_spec(base(tiny_model_dir, text_dir, tmp_path, train__device="cuda"))
    assert defaults.part_hash("train") == on_cuda.part_hash("train") != plain.part_hash("train")
    assert len({on_cuda.part_hash("train"), reference.part_hash("train"), fused.part_hash("train")}) == 3
    assert reference.train_config(1000, "cuda").triton is False and fused.train_config(1000, "cuda").fused_topk


def test_a_trainer_refuses_the_fused_kernel_where_it_cannot_run():
    import torch  # noqa: F401  (the trainer's module needs it; the spec's checks do not)

    from sae.config import SAEConfig, TrainConfig
    from sae.train import Trainer

    with pytest.raises(ValueError) as e:
        Trainer(SAEConfig(16, 64, 4), TrainConfig(tokens=4096, fused_topk=True))
    assert str(e.value) == "train.fused_topk: not with device cpu (CUDA only): set it to false"
