"""The registry as users drive it: promotion by rule and by hand, `saeflow ls`, from_pretrained for
every kind of reference, a real MLflow server (PostgreSQL, artifacts in S3) from a fresh process,
the model card, and one-line errors for references and files that are not what they should be."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from servers import BIN

from flows import stages
from flows.spec import parse_spec
from sae.config import SAEConfig
from sae.model import TopKSAE
from storage import formats

HOOK = "model.layers.1"


def spec_for(tiny_model_dir, text_dir, tmp_path, tokens: int, tracking_uri: str, **registry):
    return parse_spec(
        {
            "name": f"tiny-{tokens}",
            "model": {"source": str(tiny_model_dir)},
            "data": {
                "source": str(text_dir),
                "context_length": 16,
                "tokens": 1500,
                "eval_fraction": 0.3,
                "store": str(tmp_path / "store"),
            },
            "hookpoints": [HOOK],
            "sae": {"n_latents": 64, "k": 4, "dead_tokens": 500},
            "train": {"batch_tokens": 128, "tokens": tokens},
            "eval": {"tokens": 300, "downstream_contexts": 4, "browser": False, "ablation_contexts": 0},
            "registry": {"tracking_uri": tracking_uri, "model_name": "tiny", **registry},
            "workdir": str(tmp_path / "work"),
        }
    )


def test_promotion_by_rule_then_by_hand_and_ls(prefect_harness, tiny_model_dir, text_dir, tmp_path):
    import contextlib
    import io

    from mlflow import MlflowClient

    from flows.cli import main
    from flows.pipeline import pipeline
    from storage.registry import model_version

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rule = {"promote_if": {"metric": "normalized_mse", "margin": 0.0, "alias": "champion"}}
    good = spec_for(tiny_model_dir, text_dir, tmp_path, 1500, uri, **rule)
    pipeline(good)
    assert str(model_version("models:/tiny@champion").version) == "1"  # the first ranked version
    first = MlflowClient().get_model_version("tiny", "1").description
    assert "the first version ranked by normalized_mse" in first.splitlines()[-1]
    assert first.startswith("**tiny version 1** (registered as `@candidate`)")  # then its summary
    assert "`saeflow pull models:/tiny/1 --out ./sae`" in first

    worse = spec_for(tiny_model_dir, text_dir, tmp_path, 256, uri, **rule)  # 2 steps instead of 12
    pipeline(worse)
    assert str(model_version("models:/tiny@candidate").version) == "2"
    assert str(model_version("models:/tiny@champion").version) == "1"  # not better: stays
    note = MlflowClient().get_model_version("tiny", "2").description.splitlines()[-1]
    assert note.startswith("not promoted to champion: normalized_mse") and "of version 1" in note
    runs = {v: MlflowClient().get_run(model_version(f"models:/tiny/{v}").run_id) for v in ("1", "2")}
    mse = {v: run.data.metrics["normalized_mse"] for v, run in runs.items()}  # metrics live on the runs
    assert mse["2"] > mse["1"]
    # registered, then killed before promote_if decided: the next run decides (register is not Cached)
    assert model_version("models:/tiny/2").tags["saeflow.promote_if"] == "champion"
    MlflowClient().delete_model_version_tag("tiny", "2", "saeflow.promote_if")
    pipeline(worse)
    assert model_version("models:/tiny/2").tags["saeflow.promote_if"] == "champion"
    assert MlflowClient().get_model_version("tiny", "2").description.count("not promoted to champion") == 2
    assert str(model_version("models:/tiny@champion").version) == "1"

    # by hand: the candidate becomes champion
    assert main(["promote", "tiny", "@candidate", "--alias", "champion", "--tracking-uri", uri]) == 0
    assert str(model_version("models:/tiny@champion").version) == "2"
    assert "promoted to champion by hand" in MlflowClient().get_model_version("tiny", "2").description
    # (not capsys: Prefect's log handler, set up in this test, would keep its closed stream)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["ls", "--json", "--tracking-uri", uri]) == 0
    (listed,) = json.loads(out.getvalue())
    assert listed["name"] == "tiny" and listed["aliases"] == {"candidate": 2, "champion": 2}
    assert [v["version"] for v in listed["versions"]] == [2, 1]
    assert listed["versions"][1]["metrics"]["normalized_mse"] == pytest.approx(mse["1"], rel=1e-5)
    tags = model_version("models:/tiny/1").tags  # identity and provenance only
    assert set(tags) == {
        "lm",
        "lm_revision",
        "hookpoint",
        "n_latents",
        "k",
        "data",
        "recipe_version",
        "spec_hash",
        "eval_data",
        "weights_sha256",
        "saeflow.complete",
        "saeflow.promote_if",
    }
    assert tags["n_latents"] == "64" and not any(k.startswith("metric.") for k in tags)
    params = runs["1"].data.params  # the values the run trained with, not "auto"
    assert params["optimizer"] == "signum" and float(params["lr"]) > 0 and params["train_tokens"] == "1536"

    # other evaluation tokens: the rule does not compare, and says so
    other_eval = parse_spec(
        {**worse.model_dump(mode="json"), "name": "tiny-other", "eval": {**worse.eval.model_dump(), "tokens": 200}}
    )
    pipeline(other_eval)
    assert "evaluated on other tokens" in MlflowClient().get_model_version("tiny", "3").description
    assert str(model_version("models:/tiny@champion").version) == "2"

    # a champion without the metric (registered by hand, on the same tokens): the rule says so, and
    # leaves the alias
    from flows.stages import eval_data_hash
    from storage.registry import register_sae

    bare = register_sae(
        stages.sae_dir(good, HOOK),
        tracking_uri=uri,
        experiment="by-hand",
        model_name="tiny",
        alias="champion",
        params={"imported_from": "saeflow", "source": "test"},
        metrics={},
        tags={"eval_data": eval_data_hash(good)},
    )
    pipeline(spec_for(tiny_model_dir, text_dir, tmp_path, 512, uri, **rule))
    note = MlflowClient().get_model_version("tiny", "5").description.splitlines()[-1]
    assert note == f"not promoted to champion: version {bare.version} there has no normalized_mse to compare with; " + (
        "`saeflow promote` moves the alias by hand"
    )
    assert str(model_version("models:/tiny@champion").version) == bare.version


def test_from_pretrained_every_reference_kind_and_the_model_card(
    prefect_harness, tiny_model_dir, text_dir, tmp_path, monkeypatch
):
    import mlflow

    from flows.pipeline import pipeline
    from storage.registry import model_version, pull

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = spec_for(tiny_model_dir, text_dir, tmp_path, 1500, uri)
    pipeline(spec)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    reference = TopKSAE.load(stages.sae_dir(spec, HOOK))
    x = torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    expected = reference(x)
    version = model_version("models:/tiny@candidate")
    refs = ["models:/tiny@candidate", "models:/tiny/1", str(stages.sae_dir(spec, HOOK))]
    mlflow.set_tracking_uri(uri)
    run_artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(version.run_id)]
    refs.append(f"runs:/{version.run_id}/sae")
    for ref in refs:
        sae = TopKSAE.from_pretrained(ref)
        assert torch.allclose(sae(x), expected), (ref, run_artifacts)
    pulled = pull("models:/tiny@candidate", tmp_path / "pulled")
    card = (pulled / "MODEL_CARD.md").read_text()
    assert (
        card.startswith("# tiny")
        and "normalized_mse" in card
        and 'TopKSAE.from_pretrained("models:/tiny@candidate")' in card
    )
    assert "optimizer signum, lr 0.0" in card and "lr auto" not in card and "None" not in card

    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model("models:/tiny@candidate")
    codes = model.predict(x.numpy())
    recon = model.predict(x.numpy(), params={"output": "reconstruction"})
    assert codes.shape == (32, 64) and (codes != 0).sum(1).max() <= 4
    assert torch.allclose(torch.from_numpy(recon), expected, atol=1e-5)


def test_real_mlflow_server_register_promote_and_pull_from_a_fresh_process(
    prefect_harness, mlflow_server, s3_server, tiny_model_dir, text_dir, tmp_path
):
    from flows.pipeline import pipeline

    spec = spec_for(tiny_model_dir, text_dir, tmp_path, 1500, mlflow_server)
    rows = pipeline(
        parse_spec(
            {**spec.model_dump(mode="json"), "registry": {"tracking_uri": mlflow_server, "model_name": "tiny-served"}}
        )
    )
    assert rows[0]["model_uri"] == "models:/tiny-served@candidate"
    # read back from the server: metrics on the run, identity in the tags, a summary as description
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    version = client.get_model_version("tiny-served", "1")
    run = client.get_run(version.run_id)
    assert run.data.metrics["normalized_mse"] == pytest.approx(rows[0]["normalized_mse"], rel=1e-6)
    assert run.data.metrics["l0"] == pytest.approx(rows[0]["l0"])
    assert not any(k.startswith("metric.") for k in version.tags) and version.tags["hookpoint"] == HOOK
    assert version.tags["recipe_version"].isdigit() and len(version.tags["weights_sha256"]) == 64
    assert f"normalized_mse **{rows[0]['normalized_mse']:.4g}**" in version.description
    assert "saeflow pull models:/tiny-served/1 --out ./sae" in version.description
    assert "No feature browser was built (eval.browser is off)" in version.description
    assert "saeflow report" in run.data.tags["mlflow.note.content"]  # eval.browser is off here
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_S3_ENDPOINT_URL": s3_server["endpoint"]}
    saeflow = str(BIN / "saeflow")
    done = subprocess.run(
        [saeflow, "promote", "tiny-served", "1", "--alias", "champion"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "models:/tiny-served@champion -> version 1" in done.stdout, done.stderr
    check = (
        "from sae import TopKSAE; import torch; sae = TopKSAE.from_pretrained('models:/tiny-served@champion'); "
        "print(sae.cfg.n_latents, sae.metadata['hookpoint'])"
    )
    done = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["64", HOOK], done.stderr[-2000:]


# bad references and files: one line, exit 2 -------------------------------------------------------
def saved(tmp_path) -> Path:
    sae = TopKSAE(SAEConfig(8, 16, 2))
    return sae.save(tmp_path / "sae")


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "make, argv, message",
    [
        (
            lambda p: None,
            ["export", "models:/nope@champion", "--format", "saelens", "--out", "o"],
            "models:/nope@champion",
        ),
        (lambda p: None, ["export", "models:/nope", "--format", "saelens", "--out", "o"], "write models:/NAME@ALIAS"),
        (lambda p: (p / "junk").mkdir(), ["import", "junk"], "not an SAE directory in a known format"),
        (
            lambda p: truncate(saved(p) / "sae.safetensors"),
            ["import", "sae"],
            "sae/sae.safetensors does not match the sha256 in its config.json",
        ),
        (
            lambda p: (saved(p) / "config.json").write_text(json.dumps({"sae": {"d_in": 9, "n_latents": 16, "k": 2}})),
            ["import", "sae"],
            "W_dec has shape (16, 8), but the config says (16, 9)",
        ),
        (lambda p: None, ["import", "no-such-dir"], "no-such-dir: no such directory"),
    ],
)
def test_bad_references_and_files_are_one_line_exit_2(tmp_path, monkeypatch, capsys, make, argv, message):
    from flows.cli import main

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from storage.registry import _mlflow

    _mlflow(uri).MlflowClient().search_registered_models()  # an existing, empty registry
    make(tmp_path)
    capsys.readouterr()
    assert main([*argv, *(["--tracking-uri", uri] if argv[0] == "export" else [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists() and not (tmp_path / "imported-sae").exists()


def test_import_registers_once_and_exports_back(tmp_path, capsys):
    from flows.cli import main
    from storage.registry import list_versions

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sae = TopKSAE(SAEConfig(8, 16, 2, normalization="none"))
    out = formats.export(sae, "sparsify", tmp_path / "peer")
    for _ in range(2):  # the same weights imported twice: one version
        assert main(["import", str(out), "--register", "imported", "--tracking-uri", uri]) == 0
    assert [v["version"] for v in list_versions(uri, "imported")] == [1]
    assert (
        main(
            [
                "export",
                "models:/imported@candidate",
                "--format",
                "saelens",
                "--out",
                str(tmp_path / "lens"),
                "--tracking-uri",
                uri,
            ]
        )
        == 0
    )
    assert formats.detect(tmp_path / "lens") == "saelens"
    capsys.readouterr()
    assert (
        main(
            [
                "export",
                "models:/imported@nope",
                "--format",
                "saelens",
                "--out",
                str(tmp_path / "x"),
                "--tracking-uri",
                uri,
            ]
        )
        == 2
    )  # the model exists, the alias does not
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "models:/imported@nope is not registered" in err[0], err
    assert not (tmp_path / "x").exists()


def test_a_saelens_jumprelu_skip_transcoder_imports_registers_and_pulls(tmp_path, capsys):
    """A SAELens JumpReLU skip-transcoder (the file layout storage.formats writes and SAELens's own
    loader opens: tests/test_interop.py) registers by `saeflow import`; pulled, it predicts the same
    and its card and tags say what it is."""
    from mlflow import MlflowClient

    from flows.cli import main
    from storage.registry import pull

    g = torch.Generator().manual_seed(0)
    cfg = SAEConfig(8, 16, 16, normalization="none", activation="jumprelu", transcoder=True, skip_connection=True)
    sae = TopKSAE(cfg, generator=g)
    with torch.no_grad():
        sae.threshold.uniform_(0, 0.5, generator=g)
        sae.W_skip.normal_(generator=g)
    sae.metadata = {"model": "tiny-lm", "hookpoint": "model.layers.3.mlp"}
    lens = formats.export(sae, "saelens", tmp_path / "lens")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["import", str(lens), "--register", "gemma-tc", "--tracking-uri", uri]) == 0
    assert "registered" in capsys.readouterr().out
    pulled = TopKSAE.load(pull("models:/gemma-tc@candidate", tmp_path / "pulled", uri))
    x = torch.randn(20, 8, generator=g)
    with torch.no_grad():
        assert torch.allclose(pulled.predict(x), sae.predict(x), atol=1e-6)
    card = (tmp_path / "pulled" / "MODEL_CARD.md").read_text()
    assert "A JumpReLU skip-transcoder (Paulo et al. 2025): it reads the input of `model.layers.3.mlp`" in card
    assert "imported from saelens" in card and "each latent above its own threshold (jumprelu)" in card
    tags = MlflowClient(uri, uri).get_model_version_by_alias("gemma-tc", "candidate").tags
    assert tags["dictionary"] == "skip-transcoder" and tags["activation"] == "jumprelu" and tags["k"] == ""


def test_lookups_find_the_embedded_registry_and_never_create_a_database(tmp_path, monkeypatch):
    """In a fresh process without a tracking URI, from_pretrained and `saeflow ls` use
    ./.saeflow/mlflow.db where it exists; elsewhere they say what to pass, and no lookup leaves an
    mlflow.db behind. A URI given, or set in the process, is used; a SQLite one must exist."""
    from flows.cli import main
    from storage.registry import NoRegistry

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / ".saeflow").mkdir()
    embedded = f"sqlite:///{tmp_path / '.saeflow' / 'mlflow.db'}"
    sae = TopKSAE(SAEConfig(8, 16, 2))
    assert main(["import", str(sae.save(tmp_path / "saved")), "--register", "found", "--tracking-uri", embedded]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    load = "from sae import TopKSAE; TopKSAE.from_pretrained('models:/found@candidate'); print('loaded')"

    def fresh(cwd, *args):
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)

    assert fresh(tmp_path, "-c", load).stdout.strip() == "loaded"
    listed = fresh(tmp_path, "-m", "flows.cli", "ls")
    assert listed.returncode == 0 and listed.stdout.startswith("found  @candidate -> v1"), listed
    refused = fresh(elsewhere, "-c", load)
    assert refused.returncode == 1 and "NoRegistry: no MLflow tracking URI: pass one" in refused.stderr
    refused = fresh(elsewhere, "-m", "flows.cli", "ls")
    err = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(err) == 1 and "no MLflow tracking URI" in err[0], refused
    assert list(elsewhere.iterdir()) == []  # no database, nothing else

    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    monkeypatch.chdir(elsewhere)
    with pytest.raises(NoRegistry, match="typo.db: no such MLflow database file"):
        TopKSAE.from_pretrained("models:/found@candidate", tracking_uri=f"sqlite:///{elsewhere / 'typo.db'}")
    assert torch.equal(TopKSAE.from_pretrained("models:/found/1", tracking_uri=embedded)(x), sae(x))
    assert torch.equal(TopKSAE.from_pretrained("models:/found@candidate")(x), sae(x))  # the process's URI now
    assert list(elsewhere.iterdir()) == []
