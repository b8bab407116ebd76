"""What the read-only commands say and how little they load: `validate` shows the values a run will
train with and ends with one summary line; `--debug` works on either side of the subcommand; every
subcommand's help has a description and an example; validate and status load neither torch nor
transformers once the model's outline is cached (storage/model_outline.py)."""

import argparse
import json
import os
import subprocess
import sys

import pytest
import yaml
from test_spec import base, write

from flows.cli import build_parser, main
from flows.spec import SpecError, load_spec
from sae.train import Trainer
from storage import model_outline


def test_validate_shows_what_a_run_trains_with_and_ends_with_a_summary(tiny_model_dir, text_dir, tmp_path, capsys):
    path = write(tmp_path, base(tiny_model_dir, text_dir, tmp_path))
    assert main(["validate", path]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    spec = load_spec(path)
    # the trainer a run builds: the cache holds data.tokens in whole contexts of 15 kept positions
    cached = -(-spec.data.tokens // 15) * 15
    trainer = Trainer(spec.sae_config(32), spec.train_config(cached, "cpu"))
    sae_line = next(line for line in lines if line.startswith("sae "))
    assert f"signum lr {trainer.base_lr:.4g} (auto)" in sae_line
    warmup = trainer.tcfg.warmup_tokens()
    assert f"(auto), warmup {warmup:,} tokens  dead" in sae_line and warmup > 0  # no decay: sign descent
    assert f"dead after {trainer.tracker.dead_tokens:,} tokens" in sae_line
    assert f"{cached:,} tokens = {-(-cached // 256)} steps" in sae_line
    assert "n_latents 64  k 4" in sae_line
    assert lines[-1] == (
        f"saeflow validate: {path} is valid: 1 SAE (1 hookpoint x 1), {-(-cached // 256)} steps each; "
        f"train with `saeflow run {path}`"
    )
    assert len(lines) == 4


def test_validate_full_prints_the_spec_with_defaults_then_the_resolved_values(
    tiny_model_dir, text_dir, tmp_path, capsys
):
    spec = base(tiny_model_dir, text_dir, tmp_path, train__lr=0.003, train__optimizer="adam")
    spec["sae"] = [{"n_latents": 64, "k": 4}, {"n_latents": 128, "k": 8, "lr": 0.001}]
    path = write(tmp_path, spec)
    assert main(["validate", path, "--full"]) == 0
    out = capsys.readouterr().out
    dumped, resolved = out.split("\nmodel ", 1)
    assert yaml.safe_load(dumped)["eval"]["tokens"] == 8192  # a default, filled in
    sae0, sae1 = (line for line in resolved.splitlines() if line.startswith("sae."))
    assert "adam lr 0.003, warmup 50 tokens, linear decay" in sae0 and "(auto)" not in sae0
    assert "n_latents 128  k 8" in sae1 and "adam lr 0.001, warmup" in sae1
    assert "2 SAEs (1 hookpoint x 2)" in out.splitlines()[-1]


def test_debug_works_before_and_after_the_subcommand(tmp_path, capsys):
    missing = str(tmp_path / "none.yaml")
    assert main(["validate", missing]) == 2
    assert capsys.readouterr().err.strip() == f"error in spec {missing}: spec file {missing} does not exist"
    for argv in (["--debug", "validate", missing], ["validate", missing, "--debug"], ["validate", "--debug", missing]):
        with pytest.raises(SpecError, match="does not exist"):
            main(argv)


def test_every_subcommand_has_a_description_and_an_example():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert len(sub.choices) >= 17
    for name, command in sub.choices.items():
        text = command.format_help()
        assert command.description and command.description.endswith("."), name
        example = text.split("example:\n", 1)[1].strip()
        assert example.startswith(f"saeflow {name} "), (name, example)
        assert "--debug" in text, name


def _modules_after(argv_list: list[list[str]], cwd) -> list[str]:
    code = (
        "import sys\nfrom flows.cli import main\n"
        f"for argv in {argv_list!r}:\n    assert main(argv) == 0, argv\n"
        "print(sorted(m for m in ('torch', 'transformers', 'mlflow', 'prefect') if m in sys.modules))"
    )
    env = {**os.environ, "SAEFLOW_CACHE_DIR": str(cwd / "cache")}  # an outline cache of its own
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1].replace("'", '"'))


def test_validate_and_status_load_no_heavy_library_once_the_outline_is_cached(tiny_model_dir, text_dir, tmp_path):
    path = write(tmp_path, base(tiny_model_dir, text_dir, tmp_path))
    assert "transformers" in _modules_after([["validate", path]], tmp_path)  # the first computes the outline
    assert _modules_after([["validate", path], ["status", path]], tmp_path) == []


def test_the_outline_cache_is_keyed_by_the_config_and_survives_damage(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SAEFLOW_CACHE_DIR", str(tmp_path / "cache"))
    nowhere = tmp_path / "not-converted"
    fresh = model_outline.model_outline(str(tiny_model_dir), nowhere)
    assert fresh.d_model == 32 and "model.layers.1" in fresh.modules and "model.layers.1.mlp" in fresh.modules
    key = model_outline.outline_key(tiny_model_dir / "config.json")
    cached = tmp_path / "cache" / "outlines" / f"{key}.json"
    assert json.loads(cached.read_text())["modules"] == list(fresh.modules)
    cached.write_text('{"key": "' + key + '", "d_model": "torn')  # damaged: computed again, and rewritten
    assert model_outline.model_outline(str(tiny_model_dir), nowhere) == fresh
    assert json.loads(cached.read_text())["d_model"] == 32
    other = tmp_path / "other"  # another config: another key
    other.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    assert model_outline.outline_key(other / "config.json") != key
    assert "model.layers.2" in fresh.modules
    assert "model.layers.2" not in model_outline.model_outline(str(other), nowhere).modules
