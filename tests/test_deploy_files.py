"""deploy/: what can be checked without Docker or a cluster. Every file parses, every file or
directory they name exists, the Prefect deployments load their flows and take their parameters, the
pools line up across the files, and the Kubernetes job template uses only variables it declares."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
REPO = DEPLOY.parent


def load(name: str):
    text = (DEPLOY / name).read_text()
    return json.loads(text) if name.endswith(".json") else yaml.safe_load(text)


def test_prefect_deployments_load_their_flows_and_name_stage_pools_after_themselves():
    from prefect.utilities.importtools import import_object

    from flows.pipeline import STAGE_DEPLOYMENT

    deployments = load("prefect.yaml")["deployments"]
    for d in deployments:
        flow = import_object(d["entrypoint"])
        accepted = set(inspect.signature(flow.fn).parameters)
        assert set(d.get("parameters", {})) <= accepted, d["name"]
        if flow.name == STAGE_DEPLOYMENT:  # the pipeline calls saeflow-stage/<pool>: the name is the pool's
            assert d["name"] == d["work_pool"]["name"], d
    assert {d["work_pool"]["name"] for d in deployments} == {"saeflow", "gpu", "cpu"}


def test_compose_references_exist_and_its_workers_serve_the_deployed_pools():
    compose = load("docker-compose.yml")
    pools = {d["work_pool"]["name"] for d in load("prefect.yaml")["deployments"]}
    served = set()
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), (name, source)
        served |= set(re.findall(r"prefect worker start --pool (\S+)", str(service.get("command", ""))))
    assert served == pools


def test_dockerfile_copies_what_exists():
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), source


def test_kubernetes_job_template_declares_every_variable_it_uses_and_requests_a_gpu():
    template = load("k8s/gpu-job-template.json")
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template["job_configuration"])))
    declared = set(template["variables"]["properties"])
    assert used <= declared, used - declared
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    values = load("k8s/worker-values.yaml")
    assert values["worker"]["config"]["workPool"] in {
        d["work_pool"]["name"] for d in load("prefect.yaml")["deployments"]
    }
