"""Deployment manifests stay consistent with the code they deploy."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_raycluster_matches_installed_ray():
    import ray

    spec = yaml.safe_load((ROOT / "infra/kuberay/raycluster.yaml").read_text())
    assert spec["kind"] == "RayCluster"
    assert spec["spec"]["rayVersion"] == ray.__version__
    groups = {g["groupName"]: g for g in spec["spec"]["workerGroupSpecs"]}
    assert {"cpu-curation", "gpu"} <= set(groups)
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"
    for g in groups.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def test_prefect_deployments_point_at_real_flows():
    import prefect

    spec = yaml.safe_load((ROOT / "infra/prefect/prefect.yaml").read_text())
    assert spec["prefect-version"].split(".")[0] == prefect.__version__.split(".")[0]
    for deployment in spec["deployments"]:
        path, func = deployment["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, func)
        assert isinstance(flow, prefect.Flow), deployment["entrypoint"]
        params = set(flow.parameters.properties)
        assert set(deployment["parameters"]) <= params, (deployment["name"], params)
