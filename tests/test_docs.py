"""Every command and code example of README.md and docs/ (`make docs-check`; part of `make test`):

- YAML blocks are specs, or parts of one: they validate (a part merged into the demo spec);
- every `saeflow` line parses with the CLI's own parser; those that a registry and a few files
  suffice for run for real, in a sandbox, in the order the docs give them, and the test that runs
  each other command through the CLI is found;
- Python blocks run, in the same sandbox, with small stand-ins for the data they assume;
- a benchmark's command names only flags its script has (the benchmarks take minutes to hours: their
  numbers are in docs/benchmarks.md, made by the commands shown there);
- every other command (servers, deployments, make, the GPU check) is named in the test that runs it.

A doc whose example breaks fails here, naming the file and line.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SANDBOX_DOCS = ("README.md", "registry.md", "python-api.md", "dictionaries.md")  # their examples run in the sandbox
MODEL = "smollm2-demo"  # the registered model the examples name
D_IN = 32  # the tiny test model's width


def blocks(path: Path) -> list[tuple[str, str, int]]:
    """(language, text, first line) of each fenced block."""
    found, lines = [], path.read_text().split("\n")
    i = 0
    while i < len(lines):
        if lines[i].startswith("```"):
            lang, start, body = lines[i][3:].strip(), i + 1, []
            i += 1
            while not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            found.append((lang, "\n".join(body), start + 1))
        i += 1
    return found


def command_lines(path: Path) -> list[tuple[str, int]]:
    """The commands of a doc's plain blocks: a line each, comments and continuations dropped."""
    out = []
    for lang, text, first in blocks(path):
        if lang not in ("", "bash", "sh"):  # ```text: output, not commands
            continue
        for offset, line in enumerate(text.split("\n")):
            command = re.split(r"\s+#", " " + line)[0].strip()
            if command and not line.startswith(" ") and re.match(r"[a-z]", command):
                out.append((command, first + offset))
    return out


def inline_commands(path: Path) -> list[tuple[str, int]]:
    """Commands quoted in the prose: `saeflow ...`, `python benchmarks/...`, `bash benchmarks/...`."""
    out, fenced = [], False
    for number, line in enumerate(path.read_text().split("\n"), 1):
        fenced ^= line.startswith("```")
        if not fenced:
            out += [(m, number) for m in re.findall(r"`((?:saeflow |python benchmarks/|bash benchmarks/)[^`]*)`", line)]
    return out


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(REPO)}:{line}"


def all_commands() -> list[tuple[Path, str, int]]:
    return [(path, command, line) for path in DOCS for command, line in command_lines(path) + inline_commands(path)]


# YAML -----------------------------------------------------------------------------------------------
def test_yaml_blocks_are_valid_specs():
    """A whole spec validates as it is; a part of one, merged into the demo's spec."""
    from flows.spec import parse_spec

    demo = yaml.safe_load((REPO / "specs" / "demo.yaml").read_text())
    checked = 0
    for path in DOCS:
        spec = demo  # a doc's parts add up, as its reader's spec does (e.g. a URL workdir, then pools)
        for lang, text, line in blocks(path):
            if lang != "yaml":
                continue
            part = yaml.safe_load(text)
            spec = part if "name" in part and "model" in part else {**spec, **part}
            if isinstance(spec.get("sae"), dict) and part.get("sweep"):  # a sweep template has no n_latents
                spec["sae"] = {k: v for k, v in spec["sae"].items() if k not in ("n_latents", "k")}
            try:
                parse_spec(spec)
            except Exception as e:  # noqa: BLE001  (reported with its place)
                pytest.fail(f"{where(path, line)}: the YAML block does not validate: {e}")
            checked += 1
    assert checked >= 7


# the command line -----------------------------------------------------------------------------------
PLACEHOLDERS = {
    "SPEC": "specs/demo.yaml",
    "MODEL_URI": f"models:/{MODEL}@candidate",
    "NAME": MODEL,
    "VERSION|@ALIAS": "@candidate",
    "ALIAS": "champion",
    "A": "champion",
    "DIR": "out",
    "REF": "my-sae",
    "URI": "sqlite:///mlflow.db",
    "X": "1e17",
    "FIT.json": "fit.json",
    "...": "ls",  # `saeflow --debug ...`: any command
}


def concrete(command: str) -> list[str]:
    """A synopsis line as one command: each PLACEHOLDER filled in, optional [parts] kept, the first of
    alternatives (`a|b`, or `--x A | --y B` inside brackets)."""
    tokens = shlex.split(command.replace("[", " [ ").replace("]", " ] "))

    def group(i: int) -> tuple[list[str], int]:  # the words up to the closing bracket, first alternative only
        chosen: list[str] = []
        alternative = chosen
        while i < len(tokens) and tokens[i] != "]":
            token = tokens[i]
            if token == "[":
                inner, i = group(i + 1)
                alternative.extend(inner)
            elif token == "|":
                alternative = []  # later alternatives are read and dropped
            else:
                word = PLACEHOLDERS.get(token, token)
                if "|" in word and not word.startswith(("sqlite", "models:")):
                    word = word.split("|")[0]
                alternative.append(word)
            i += 1
        return chosen, i

    return group(0)[0]


def test_every_saeflow_line_parses():
    from flows.cli import build_parser

    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    lines = [(p, c, n) for p, c, n in all_commands() if c.startswith("saeflow ")]
    assert len(lines) >= 25
    for path, command, line in lines:
        argv = [w.replace("$PWD", "/x") for w in concrete(command)[1:]]
        if len(argv) == 1 and not argv[0].startswith("-"):  # the prose names a command: `saeflow train`
            assert argv[0] in subcommands, f"{where(path, line)}: saeflow has no command {argv[0]}"
            continue
        try:
            parser.parse_args(argv)
        except SystemExit as e:  # 0: --help, which prints and exits
            if e.code != 0:
                pytest.fail(f"{where(path, line)}: `{command}` does not parse with saeflow's CLI")


# every other command: run by the test (or script) named for it --------------------------------------
RUN_ELSEWHERE = {
    # command prefix -> (the file that runs it, words of the command that file must hold)
    "make demo": ("Makefile", ["demo:", "saeflow run specs/demo.yaml"]),
    "make test": (".ci/run", ["make test"]),
    "prefect server start": ("tests/server_fixtures.py", ['"server", "start"']),
    "mlflow server": ("tests/server_fixtures.py", ['"server"', "--backend-store-uri", "--artifacts-destination"]),
    "dask scheduler": ("tests/server_fixtures.py", ["dask", "scheduler", "worker"]),
    "prefect work-pool create": ("tests/test_cluster_e2e.py", ['"work-pool", "create", "--type", "process"']),
    "prefect concurrency-limit create": ("tests/test_cluster_e2e.py", ['"concurrency-limit", "create", "saeflow-gpu"']),
    "prefect --no-prompt deploy": ("tests/test_cluster_e2e.py", ['"--no-prompt", "deploy", "--prefect-file"']),
    "prefect worker start": ("tests/test_cluster_e2e.py", ['"worker", "start", "-p"']),
    "prefect deployment run": ("tests/test_cluster_e2e.py", ["run_deployment", "saeflow-run-spec/saeflow"]),
    "mlflow ui": ("tests/server_fixtures.py", ['"server"', "--backend-store-uri"]),  # ui: server's alias
    "mlflow artifacts download": ("tests/test_browser.py", ["download_artifacts", "browser"]),
    "bash benchmarks/gpu_check.sh": ("benchmarks/gpu_check.sh", ["train_throughput.py"]),
    "git clone": (".ci/run", ["make test"]),
    "pip install": ("pyproject.toml", ["s3 = ["]),
}


def test_every_other_command_is_run_by_a_named_test():
    for path, command, line in all_commands():
        if command.startswith(("saeflow ", "python benchmarks/")):
            continue
        prefix = next((p for p in RUN_ELSEWHERE if command.startswith(p)), None)
        assert prefix, f"{where(path, line)}: `{command}` is run by no test: add it to RUN_ELSEWHERE with the test"
        runner, words = RUN_ELSEWHERE[prefix]
        text = (REPO / runner).read_text()
        missing = [w for w in words if w not in text]
        assert not missing, f"{where(path, line)}: {runner} no longer runs `{prefix}` ({missing} not in it)"


def test_benchmark_commands_name_only_flags_their_scripts_have():
    lines = [(p, c, n) for p, c, n in all_commands() if c.startswith("python benchmarks/")]
    assert lines
    for path, command, line in lines:
        words = concrete(command)
        script = REPO / words[1]
        assert script.exists(), f"{where(path, line)}: {words[1]} does not exist"
        source = script.read_text()
        for flag in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
            assert f'"{flag}"' in source, f"{where(path, line)}: {words[1]} has no {flag}"


# the sandbox: a registry holding the model the examples name, and the files they read ----------------
@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, tiny_model_dir):
    from sae.config import SAEConfig
    from sae.model import TopKSAE
    from storage import formats
    from storage.registry import register_sae

    root = tmp_path_factory.mktemp("docs-sandbox")
    uri = f"sqlite:///{root / '.saeflow' / 'mlflow.db'}"
    (root / ".saeflow").mkdir()
    (root / "specs").symlink_to(REPO / "specs")
    runs = []
    for seed in range(3):  # versions 1-3, as the examples name version 3
        sae = TopKSAE(SAEConfig(D_IN, 64, 4))
        sae.reset_parameters(generator=torch.Generator().manual_seed(seed))
        directory = sae.save(root / "made" / f"sae-{seed}", metadata={"hookpoint": "model.layers.1"})
        registered = register_sae(
            directory,
            tracking_uri=uri,
            experiment=MODEL,
            model_name=MODEL,
            alias="candidate",
            params={},
            metrics={"normalized_mse": 0.3 - 0.1 * seed},
            tags={"spec_hash": str(seed)},
            artifact_root=root / ".saeflow" / "mlartifacts",
        )
        runs.append(registered.run_id)
    formats.export(TopKSAE.load(root / "made" / "sae-0"), "saelens", root / "their-sae")
    scaled = TopKSAE(SAEConfig(D_IN, 64, 4, normalization="dataset_scale")).save(root / "scaled-sae")
    register_sae(  # the SAE the docs export to sparsify (which takes dataset_scale, not standardize)
        scaled,
        tracking_uri=uri,
        experiment=MODEL,
        model_name=f"{MODEL}-scaled",
        alias="candidate",
        params={},
        metrics={"normalized_mse": 0.2},
        tags={"spec_hash": "scaled"},
        artifact_root=root / ".saeflow" / "mlartifacts",
    )
    torch.save(torch.randn(2048, D_IN, generator=torch.Generator().manual_seed(0)), root / "acts.pt")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    return {"root": root, "uri": uri, "run_id": runs[-1], "env": env, "model_dir": tiny_model_dir}


CHEAP = ("pull", "promote", "ls", "export", "import", "plan", "plan-memory")  # what the sandbox suffices for


def test_the_registry_commands_run(sandbox):
    """In the docs' order: pull, promote, ls, export, import; then planning."""
    ran = 0
    for path, command, line in all_commands():
        if path.name not in (*SANDBOX_DOCS, "scaling.md", "cli.md") or not command.startswith("saeflow "):
            continue
        argv = [w.replace("$PWD", str(sandbox["root"])) for w in concrete(command)]
        if len(argv) < 3:  # the prose names a command
            continue
        if argv[1] not in CHEAP or (path.name == "cli.md" and argv[1] != "plan-memory"):  # cli.md: synopses
            continue
        if argv[1] == "import" and "--out" in argv:  # pull made my-sae: import next to it
            argv[argv.index("--out") + 1] = "imported-sae"
        done = subprocess.run(
            [sys.executable, "-m", "flows.cli", *argv[1:]],
            cwd=sandbox["root"],
            env=sandbox["env"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        output = done.stdout[-1500:] + done.stderr[-1500:]
        assert done.returncode == 0, f"{where(path, line)}: `{command}` failed:\n{output}"
        ran += 1
    assert ran >= 8


def test_every_other_saeflow_command_is_run_by_a_test():
    """The commands the sandbox does not run (they need a model, a store, servers) are run through
    the CLI by the pipeline's tests."""
    calls = "\n".join(p.read_text() for p in (REPO / "tests").glob("test_*.py") if p.name != "test_docs.py")
    for path, command, line in all_commands():
        if not command.startswith("saeflow "):
            continue
        words = concrete(command)
        sub = next((w for w in words[1:] if not w.startswith("-")), None)
        if sub in CHEAP or sub is None:
            continue
        patterns = (f'["{sub}"', f'"flows.cli", "{sub}"', f'"saeflow", "{sub}"')
        assert any(p in calls for p in patterns), f"{where(path, line)}: no test runs `saeflow {sub}`"


def python_blocks() -> list[tuple[Path, str, int]]:
    return [
        (path, text, line)
        for path in DOCS
        if path.name in SANDBOX_DOCS
        for lang, text, line in blocks(path)
        if lang == "python"
    ]


def stand_ins(sandbox, text: str) -> dict:
    """The names an example assumes, made small: activations x, and for the evaluation example a
    tiny LM with its token ids, activations and an SAE of its width."""
    names: dict = {"x": torch.randn(16, D_IN)}
    if "target=y" in text:  # a transcoder's example: an MLP's outputs beside its inputs x
        names["y"] = torch.randn(16, D_IN)
    if "mlflow.pyfunc" in text:
        names["x"] = names["x"].numpy()
    if "EvalSource" in text:
        from conftest import corpus_texts

        from sae.config import SAEConfig
        from sae.lm import capture, load_lm
        from sae.model import TopKSAE

        model, tokenizer = load_lm(str(sandbox["model_dir"]), "float32", "cpu")
        text = tokenizer(" ".join(corpus_texts()), return_tensors="pt").input_ids[0]
        ids = text[: len(text) // 16 * 16].reshape(-1, 16)[:96]  # held-out contexts of real text
        acts = capture(model, ids, ["model.layers.1"])["model.layers.1"][:, 1:].reshape(-1, D_IN).float()
        names.update(model=model, tokenizer=tokenizer, ids=ids.numpy(), acts=acts, sae=TopKSAE(SAEConfig(D_IN, 64, 4)))
    return names


@pytest.mark.parametrize("index", range(9))
def test_python_examples_run(sandbox, index, monkeypatch):
    examples = python_blocks()
    assert len(examples) == 9, [where(p, n) for p, _, n in examples]  # one case each
    path, text, line = examples[index]
    monkeypatch.chdir(sandbox["root"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sandbox["uri"])
    code = text.replace("RUN_ID", sandbox["run_id"]).replace("model.layers.20", "model.layers.1")
    if not (sandbox["root"] / "my-sae").exists():
        from sae.model import TopKSAE

        TopKSAE.load(sandbox["root"] / "made" / "sae-2").save(sandbox["root"] / "my-sae")
    try:
        exec(compile(code, where(path, line), "exec"), stand_ins(sandbox, text))
    except Exception as e:  # noqa: BLE001  (reported with its place)
        pytest.fail(f"{where(path, line)}: the example fails: {type(e).__name__}: {e}")
