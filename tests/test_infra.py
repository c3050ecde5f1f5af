"""Deployment files stay consistent with the config and the code they deploy.

- the checked-in KubeRay and Prefect files are exactly what ``infra/duet.toml`` generates;
- every KubeRay manifest uses only fields KubeRay's ``ray.io/v1`` CRDs define, with
  their types and enums (transcribed below from KubeRay's Go API types,
  ``ray-operator/apis/ray/v1/{raycluster,rayjob,rayservice}_types.go``, and its API
  reference for ``authOptions``, KubeRay >= 1.6);
- manifests, Prefect deployments and the local stack agree (image, entrypoints,
  parameters, autoscaling bounds, env vars, resources, the Ray token);
- the Dockerfile parses (BuildKit's parser) and installs what the Makefile installs;
- joining Ray by address turns token authentication on when a token is configured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.config import ConfigError
from infra import kuberay, prefect_deploy, render
from infra.config import REPO_ROOT, VARIANTS, DeployConfig, load_deploy_config

ROOT = Path(__file__).resolve().parents[1]

# --- KubeRay's CRD fields -----------------------------------------------------------
# A schema is a dict: field -> type; a type is "str", "int", "bool", "float", "map"
# (string -> string), "any" (Kubernetes core types checked separately), a set of
# allowed strings (an enum), ("list", T), or ("obj", SCHEMA, REQUIRED_FIELDS).
_AUTOSCALER = {
    "resources": "any", "image": "str", "imagePullPolicy": "str", "securityContext": "any",
    "idleTimeoutSeconds": "int", "upscalingMode": {"Default", "Aggressive", "Conservative"},
    "env": "any", "envFrom": "any", "volumeMounts": "any", "version": {"v1", "v2"},
}  # fmt: skip
_AUTH = {"mode": {"disabled", "token"}, "secretName": "str", "enableK8sTokenAuth": "bool"}
_POD_TEMPLATE = ("obj", {"metadata": "any", "spec": "pod"}, set())
_HEAD_GROUP = {
    "template": _POD_TEMPLATE, "headService": "any", "enableIngress": "bool",
    "rayStartParams": "map", "serviceType": {"ClusterIP", "NodePort", "LoadBalancer"},
}  # fmt: skip
_WORKER_GROUP = {
    "suspend": "bool", "groupName": "str", "replicas": "int", "minReplicas": "int",
    "maxReplicas": "int", "idleTimeoutSeconds": "int", "rayStartParams": "map",
    "template": _POD_TEMPLATE, "scaleStrategy": "any", "numOfHosts": "int",
}  # fmt: skip
RAY_CLUSTER_SPEC = {
    "suspend": "bool", "managedBy": "str", "autoscalerOptions": ("obj", _AUTOSCALER, set()),
    "headServiceAnnotations": "map", "enableInTreeAutoscaling": "bool",
    "gcsFaultToleranceOptions": "any",
    "headGroupSpec": ("obj", _HEAD_GROUP, {"template"}),
    "rayVersion": "str",
    "workerGroupSpecs": ("list", ("obj", _WORKER_GROUP, {"groupName", "template"})),
    "authOptions": ("obj", _AUTH, set()),
}  # fmt: skip
RAY_JOB_SPEC = {
    "activeDeadlineSeconds": "int", "backoffLimit": "int",
    "rayClusterSpec": ("obj", RAY_CLUSTER_SPEC, {"headGroupSpec"}),
    "submitterPodTemplate": "any", "metadata": "map", "clusterSelector": "map",
    "submitterConfig": "any", "managedBy": "str",
    "deletionPolicy": {"DeleteCluster", "DeleteWorkers", "DeleteSelf", "DeleteNone"},
    "deletionStrategy": "any", "entrypoint": "str", "runtimeEnvYAML": "str", "jobId": "str",
    "submissionMode": {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"},
    "entrypointResources": "str", "entrypointNumCpus": "float", "entrypointNumGpus": "float",
    "ttlSecondsAfterFinished": "int", "shutdownAfterJobFinishes": "bool", "suspend": "bool",
}  # fmt: skip
RAY_SERVICE_SPEC = {
    "serveConfigV2": "str", "rayClusterConfig": ("obj", RAY_CLUSTER_SPEC, {"headGroupSpec"}),
    "serveService": "any", "excludeHeadPodFromServeSvc": "bool",
    "upgradeStrategy": "any", "rayClusterDeletionDelaySeconds": "int",
    "serviceUnhealthySecondThreshold": "int", "deploymentUnhealthySecondThreshold": "int",
}  # fmt: skip
METADATA = {"name": "str", "generateName": "str", "namespace": "str", "labels": "map",
            "annotations": "map"}  # fmt: skip
KINDS = {"RayCluster": RAY_CLUSTER_SPEC, "RayJob": RAY_JOB_SPEC, "RayService": RAY_SERVICE_SPEC}
# The Kubernetes core fields these manifests use (PodSpec / Container subsets).
POD_SPEC_FIELDS = {"containers", "tolerations", "volumes", "nodeSelector", "serviceAccountName"}
CONTAINER_FIELDS = {
    "name", "image", "imagePullPolicy", "workingDir", "resources", "env", "envFrom",
    "ports", "volumeMounts", "command", "args",
}  # fmt: skip
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti)?$")


def _check(value, schema, where: str, errors: list[str]) -> None:
    if isinstance(schema, set):
        if value not in schema:
            errors.append(f"{where}: {value!r} not one of {sorted(schema)}")
    elif schema == "str":
        if not isinstance(value, str):
            errors.append(f"{where}: expected a string, got {value!r}")
    elif schema == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            errors.append(f"{where}: expected an integer, got {value!r}")
    elif schema == "float":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            errors.append(f"{where}: expected a number, got {value!r}")
    elif schema == "bool":
        if not isinstance(value, bool):
            errors.append(f"{where}: expected a boolean, got {value!r}")
    elif schema == "map":
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            errors.append(f"{where}: expected a string -> string map, got {value!r}")
    elif schema == "pod":
        _check_pod(value, where, errors)
    elif schema == "any":
        return
    elif schema[0] == "list":
        if not isinstance(value, list):
            errors.append(f"{where}: expected a list")
            return
        for i, item in enumerate(value):
            _check(item, schema[1], f"{where}[{i}]", errors)
    elif schema[0] == "obj":
        _, fields, required = schema
        if not isinstance(value, dict):
            errors.append(f"{where}: expected an object")
            return
        for key in sorted(set(value) - set(fields)):
            errors.append(f"{where}.{key}: not a field of the CRD")
        for key in sorted(required - set(value)):
            errors.append(f"{where}.{key}: required field missing")
        for key in sorted(set(value) & set(fields)):
            _check(value[key], fields[key], f"{where}.{key}", errors)


def _check_pod(pod, where: str, errors: list[str]) -> None:
    for key in sorted(set(pod) - POD_SPEC_FIELDS):
        errors.append(f"{where}.{key}: not a PodSpec field used here")
    if not pod.get("containers"):
        errors.append(f"{where}.containers: a pod needs a container")
    for i, container in enumerate(pod.get("containers", [])):
        at = f"{where}.containers[{i}]"
        for key in sorted(set(container) - CONTAINER_FIELDS):
            errors.append(f"{at}.{key}: not a Container field used here")
        for kind in ("requests", "limits"):
            for name, amount in container.get("resources", {}).get(kind, {}).items():
                if not (isinstance(amount, str) and QUANTITY.match(amount)):
                    errors.append(f"{at}.resources.{kind}.{name}: {amount!r} not a quantity")
        for env in container.get("env", []):
            if set(env) - {"name", "value", "valueFrom"} or not isinstance(env.get("name"), str):
                errors.append(f"{at}.env: malformed entry {env!r}")
            if "value" in env and not isinstance(env["value"], str):
                errors.append(f"{at}.env.{env['name']}: value must be a string")


def crd_errors(manifest: dict) -> list[str]:
    """Every way ``manifest`` departs from its KubeRay CRD (empty: it fits)."""
    errors: list[str] = []
    if manifest.get("apiVersion") != "ray.io/v1":
        errors.append(f"apiVersion {manifest.get('apiVersion')!r} is not ray.io/v1")
    kind = manifest.get("kind")
    if kind not in KINDS:
        return [*errors, f"kind {kind!r} is not a KubeRay kind"]
    for key in sorted(set(manifest) - {"apiVersion", "kind", "metadata", "spec"}):
        errors.append(f"{key}: not a top-level field")
    _check(manifest.get("metadata", {}), ("obj", METADATA, {"namespace"}), "metadata", errors)
    if not ({"name", "generateName"} & set(manifest.get("metadata", {}))):
        errors.append("metadata: needs name or generateName")
    required = {"RayCluster": {"headGroupSpec"}, "RayJob": set(), "RayService": set()}[kind]
    _check(manifest.get("spec"), ("obj", KINDS[kind], required), "spec", errors)
    return errors


def _cluster_specs(manifest: dict) -> dict:
    spec = manifest["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
            "RayService": spec.get("rayClusterConfig")}[manifest["kind"]]  # fmt: skip


@pytest.fixture(scope="module")
def cfg() -> DeployConfig:
    return load_deploy_config()


@pytest.fixture(scope="module")
def checked_in() -> dict[str, dict]:
    return {
        p.name: yaml.safe_load(p.read_text())
        for p in sorted((ROOT / "infra/kuberay").glob("*.yaml"))
    }


# --- the files match the config -----------------------------------------------------


def test_checked_in_files_are_what_the_config_generates(cfg):
    assert render.stale(cfg) == [], "run `duet manifests` after changing infra/duet.toml"
    # And the check sees a change: a different bound makes the RayCluster stale.
    changed = dataclasses.replace(
        cfg,
        cluster=dataclasses.replace(
            cfg.cluster,
            cpu_workers=dataclasses.replace(cfg.cluster.cpu_workers, max_replicas=49),
        ),
    )
    assert Path("infra/kuberay/raycluster.yaml") in render.stale(changed)


def test_every_kuberay_file_is_generated(cfg, checked_in):
    assert set(checked_in) == set(kuberay.manifests(cfg))
    assert {m["kind"] for m in checked_in.values()} == {"RayCluster", "RayJob", "RayService"}


# --- the manifests fit KubeRay's CRDs -----------------------------------------------


def test_manifests_use_only_fields_the_crds_define(checked_in):
    for name, manifest in checked_in.items():
        assert crd_errors(manifest) == [], name


def test_the_crd_check_rejects_what_kuberay_would(checked_in):
    bad = json.loads(json.dumps(checked_in["raycluster.yaml"]))
    bad["spec"]["workerGroupSpecs"][0]["minReplica"] = 1  # typo
    bad["spec"]["autoscalerOptions"]["upscalingMode"] = "Fast"
    bad["spec"]["headGroupSpec"].pop("template")
    bad["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "cpu"
    ] = 16
    errors = "\n".join(crd_errors(bad))
    for expected in ("minReplica: not a field", "'Fast' not one of", "template: required",
                     "16 not a quantity"):  # fmt: skip
        assert expected in errors
    job = json.loads(json.dumps(checked_in["rayjob-train.yaml"]))
    job["spec"]["entrypoint"] = ["python", "x.py"]
    job["spec"]["submissionMode"] = "Batch"
    assert len(crd_errors(job)) == 2


def test_serve_config_is_valid_for_ray_serve(cfg, checked_in):
    from ray.serve.schema import ServeDeploySchema

    text = checked_in["rayservice.yaml"]["spec"]["serveConfigV2"]
    schema = ServeDeploySchema.model_validate(yaml.safe_load(text))
    (app,) = schema.applications
    assert app.import_path == "serve.app:build_app" == cfg.service.import_path
    assert app.args == kuberay.serve_app_args(cfg)


# --- manifests, deployments and the local stack agree --------------------------------


def test_images_versions_and_resources_follow_the_config(cfg, checked_in):
    import ray

    for name, manifest in checked_in.items():
        spec = _cluster_specs(manifest)
        assert spec["rayVersion"] == ray.__version__, name
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert head["image"] == cfg.image.ref("cpu")
        assert head["resources"]["limits"] == {
            "cpu": str(cfg.cluster.head_cpus), "memory": f"{cfg.cluster.head_memory_gib}Gi"
        }  # fmt: skip
        ports = {p["name"]: p["containerPort"] for p in head["ports"]}
        assert ports == {"gcs": cfg.ray.gcs_port, "dashboard": cfg.ray.dashboard_port,
                         "client": cfg.ray.client_port, "serve": cfg.ray.serve_port}  # fmt: skip
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        for group in (cfg.cluster.cpu_workers, cfg.cluster.gpu_workers):
            got = groups[group.name]
            assert (got["minReplicas"], got["replicas"], got["maxReplicas"]) == (
                group.min_replicas, group.replicas, group.max_replicas
            )  # fmt: skip
            container = got["template"]["spec"]["containers"][0]
            assert container["image"] == cfg.image.ref(group.variant)
            limits = container["resources"]["limits"]
            assert limits["cpu"] == str(group.cpus)
            assert limits.get("nvidia.com/gpu", "0") == str(group.gpus)
            assert container["resources"]["requests"] == limits
        assert spec["enableInTreeAutoscaling"] is True
        assert spec["authOptions"] == {"mode": "token", "secretName": cfg.ray.auth_secret}


def test_rayjobs_run_the_deployed_flows_with_the_deployments_parameters(cfg, checked_in):
    specs = {s["flow"]: s for s in prefect_deploy.deployment_specs(cfg, "cluster")}
    local = {s["flow"]: s for s in prefect_deploy.deployment_specs(cfg, "local")}
    for key in ("curate", "train"):
        job = checked_in[f"rayjob-{key}.yaml"]["spec"]
        argv = shlex.split(job["entrypoint"])
        assert argv[:4] == ["python", "-m", "infra.run_flow", getattr(cfg.jobs, key).entrypoint]
        params = json.loads(argv[argv.index("--parameters") + 1])
        deployed = dict(specs[key]["parameters"])
        assert deployed.pop("ray_address").startswith("ray://")
        assert local[key]["parameters"]["ray_address"] == cfg.ray_address()
        assert params.pop("ray_address") == "auto"
        assert params == deployed
        assert job["activeDeadlineSeconds"] == getattr(cfg.jobs, key).active_deadline_s


def test_env_vars_agree_between_pods_and_flow_runs(cfg, checked_in):
    run_env = prefect_deploy.run_env(cfg)
    for name, manifest in checked_in.items():
        spec = _cluster_specs(manifest)
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            container = group["template"]["spec"]["containers"][0]
            env = {e["name"]: e.get("value") for e in container["env"]}
            for key, value in kuberay.flow_run_env(cfg).items():
                assert env[key] == value == run_env[key], (name, key)
            assert env["DUET_CACHE_DIR"] == cfg.image.cache_dir
            assert container["envFrom"] == [{"secretRef": {"name": cfg.s3.credentials_secret}}]
            if manifest["kind"] == "RayService":
                assert "DUET_API_KEYS" in env
    # Flow runs get the token and S3 credentials from Secret blocks, resolved by the
    # worker at run time (never stored in a deployment).
    assert run_env["RAY_AUTH_MODE"] == "token"
    assert run_env["RAY_AUTH_TOKEN"] == "{{ prefect.blocks.secret.duet-ray-auth-token }}"
    assert run_env["AWS_ENDPOINT_URL"].startswith("{{ prefect.blocks.secret.")


def test_flow_runs_on_the_cluster_join_the_rayclusters_head(cfg, checked_in):
    cluster = prefect_deploy.deployment_specs(cfg, "cluster")
    head = (
        f"ray://{checked_in['raycluster.yaml']['metadata']['name']}-head-svc:{cfg.ray.client_port}"
    )
    # Every flow that joins Ray (adgen talks to the Serve app instead).
    assert {s["parameters"].get("ray_address") for s in cluster if s["flow"] != "adgen"} == {head}
    assert all(s["work_pool"]["job_variables"]["image"] == cfg.image.ref("cpu") for s in cluster)


def test_adgen_on_the_cluster_sends_variants_to_the_rayservice(cfg, checked_in):
    service = checked_in["rayservice.yaml"]["metadata"]
    # KubeRay names the Serve Service of a RayService "<name>-serve-svc".
    url = (
        f"http://{service['name']}-serve-svc.{service['namespace']}.svc.cluster.local:"
        f"{cfg.ray.serve_port}{cfg.service.app.route_prefix}"
    )
    assert cfg.jobs.adgen.cluster_parameters["serve_url"] == url
    assert cfg.jobs.adgen.parameters["out_uri"].startswith(f"s3://{cfg.s3.runs_bucket}/")


def test_buckets_and_config_files_named_by_jobs_exist_and_load(cfg):
    from curation.pipeline import CurateConfig
    from pipelines.train.config import train_config_from

    curate = cfg.jobs.curate.parameters
    assert curate["input_glob"].startswith(f"s3://{cfg.s3.raw_bucket}/")
    assert curate["out_uri"].startswith(f"s3://{cfg.s3.curated_bucket}/")
    from core.config import load_config

    nightly = load_config(CurateConfig, str(REPO_ROOT / curate["config_uri"]))
    # Real footage has no sidecars: captions must come from a model, not only sidecars.
    assert nightly.captions.backend == "auto" and nightly.captions.model
    train = train_config_from(str(REPO_ROOT / cfg.jobs.train.parameters["config_uri"]))
    assert train.data.curated_uri == curate["out_uri"]
    assert train.run_uri.startswith(f"s3://{cfg.s3.runs_bucket}/")
    # The service serves what the weekly run fine-tunes.
    assert cfg.service.app.checkpoint == f"{train.run_uri}/sft/final"


def test_gpu_group_can_hold_the_serve_deployments_and_training(cfg):
    gpus = cfg.cluster.gpu_workers.max_replicas * cfg.cluster.gpu_workers.gpus
    app = cfg.service.app
    serve_gpus = (
        app.fast.max_replicas * app.fast.num_gpus + app.full.max_replicas * app.full.num_gpus
    )
    assert serve_gpus <= gpus
    assert cfg.jobs.train.parameters["num_workers"] <= gpus


def test_the_serve_app_builds_from_the_rayservice_args(cfg, monkeypatch):
    """The RayService's import path and args build the application the deploy config
    describes: an ingress over a Fast and a Full deployment, each with the scaling,
    back-pressure and GPUs of infra/duet.toml and the config the args carry.

    The application is expanded into deployments by the step ``serve build`` and
    ``serve.run`` take (Ray's ``build_app``; an internal module, so a Ray release
    that moves it fails here, loudly)."""
    import importlib

    from ray.serve._private.build_app import build_app as expand
    from ray.serve.deployment import deployment_to_schema

    from serve.config import serve_config_from

    module, attr = cfg.service.import_path.split(":")
    build_app = getattr(importlib.import_module(module), attr)
    args = kuberay.serve_app_args(cfg)
    # Untrained tiny weights instead of the checkpoint on S3; the rest as deployed.
    args["config"].update(checkpoint=None, random_weights_preset="tiny")
    monkeypatch.delenv(cfg.service.api_keys_env(), raising=False)
    with pytest.raises(ValueError, match="no API keys"):
        build_app(args)  # the RayService injects the keys from its secret; none: refused
    monkeypatch.setenv(cfg.service.api_keys_env(), "test-key")
    built = expand(build_app(args), name=cfg.service.app.app_name)
    deployments = {d.name: d for d in built.deployments}
    assert built.ingress_deployment_name == "ingress"
    assert set(deployments) == {"ingress", "fast", "full"}
    app = cfg.service.app
    deployed = serve_config_from(args["config"])
    assert deployed.checkpoint is None and deployed.random_weights_preset == "tiny"
    for quality, wanted in (("fast", app.fast), ("full", app.full)):
        deployment = deployments[quality]
        config, given_quality = deployment.init_args
        assert given_quality == quality
        assert serve_config_from(config) == deployed, "the replicas get another config"
        schema = deployment_to_schema(deployment).model_dump(exclude_unset=True)
        scaling = schema["autoscaling_config"]
        assert (scaling["min_replicas"], scaling["max_replicas"]) == (
            wanted.min_replicas,
            wanted.max_replicas,
        )
        assert scaling["target_ongoing_requests"] == wanted.target_ongoing_requests
        assert (schema["max_ongoing_requests"], schema["max_queued_requests"]) == (
            wanted.max_ongoing_requests,
            wanted.max_queued_requests,
        )
        assert schema["ray_actor_options"].get("num_gpus", 0) == wanted.num_gpus
    ingress = deployment_to_schema(deployments["ingress"]).model_dump(exclude_unset=True)
    assert ingress["num_replicas"] == app.ingress_replicas
    assert ingress["backpressure_config"]["status_code"] == 429
    assert serve_config_from(deployments["ingress"].init_args[0]) == deployed


def test_prefect_deployments_point_at_real_flows(cfg):
    import prefect

    from infra.run_flow import load_flow

    spec = yaml.safe_load((ROOT / "infra/prefect/prefect.yaml").read_text())
    assert spec["prefect-version"].split(".")[0] == prefect.__version__.split(".")[0]
    for target in prefect_deploy.TARGETS:
        specs = prefect_deploy.deployment_specs(cfg, target)
        for deployment in specs:
            flow = load_flow(deployment["entrypoint"])
            assert isinstance(flow, prefect.Flow), deployment["entrypoint"]
            assert flow.name == deployment["flow"] or deployment["flow"] == "train"
            params = set(flow.parameters.properties)
            assert set(deployment["parameters"]) <= params, (deployment["name"], params)
            for schedule in deployment["schedules"]:
                from prefect.client.schemas.schedules import CronSchedule

                CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
                # Laptops register schedules paused; the cluster runs them.
                assert schedule["active"] is (target == "cluster")
        flows = {d["flow"] for d in specs}
        assert {"curate", "train"} <= flows
        # adgen is deployed once its flow exists (flows/adgen.py, the serving work).
        assert ("adgen" in flows) == (ROOT / "flows/adgen.py").exists()


def test_bad_deploy_config_is_refused_with_its_path():
    with pytest.raises(ConfigError, match="client_port 10005 lies in the worker port range"):
        load_deploy_config({"ray": {"client_port": 10005}})
    with pytest.raises(ConfigError, match="min_replicas <= replicas"):
        load_deploy_config({"cluster": {"gpu_workers": {"replicas": 3, "max_replicas": 2}}})
    with pytest.raises(ConfigError, match="unknown field"):
        load_deploy_config({"cluster": {"worker_groups": []}})


# --- the Dockerfile installs what the Makefile installs ------------------------------


def _install_steps(commands: list[str], args: dict[str, str]) -> list[str]:
    """Commands that install something, in a form both files share."""
    steps = []
    for command in commands:
        for part in re.split(r"\s*(?:&&|\|\||;)\s*", command):
            part = re.sub(r"\s*2>&1\s*\|\s*\$\(PIPQ\)", "", part)
            part = part.strip().lstrip("@").strip("()")
            part = re.sub(r"\s*2>/dev/null", "", part)
            part = re.sub(r"--index-url\s+\S+", "", part)
            for name, value in args.items():
                part = part.replace("${" + name + "}", value)
            part = part.replace("$(BIN)/", "").replace(".venv/bin/", "").replace('"', "")
            words = [w for w in part.split() if w != "-q"]
            text = " ".join(words)
            if re.match(r"^(pip install|python -m curation|bash infra/local|\S+ -m venv)", text):
                steps.append(re.sub(r"^\S+ -m venv.*", "venv", text))
    return steps


def test_dockerfile_parses_and_installs_what_the_makefile_installs(cfg):
    import dockerfile

    commands = dockerfile.parse_file(str(ROOT / "infra/Dockerfile"))
    known = {"FROM", "ARG", "ENV", "WORKDIR", "COPY", "RUN", "USER", "CMD", "LABEL"}
    assert {c.cmd for c in commands} <= known
    args = dict(c.value[0].split("=", 1) for c in commands if c.cmd == "ARG")
    docker_runs = [c.value[0] for c in commands if c.cmd == "RUN"]

    makefile = (ROOT / "Makefile").read_text()
    recipe = []
    for target in (r"\$\(STAMP\)", "whisperx-env"):
        block = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
        recipe += [line.strip() for line in block.splitlines()]
    make_steps = _install_steps(recipe, {})
    docker_steps = _install_steps(docker_runs, args)
    assert make_steps == [
        "bash infra/local/install_system_deps.sh",
        "venv",
        "pip install --upgrade pip",
        f"pip install torch=={args['TORCH_VERSION']}",
        "pip install -e .[dev]",
        "python -m curation.speech_env build",
    ]
    assert docker_steps == make_steps
    # The variants the image builds are the ones the manifests name.
    case = next(run for run in docker_runs if "VARIANT" in run)
    assert set(re.findall(r"(\w+)\) index=", case)) == set(VARIANTS)
    workdir = [c.value[0] for c in commands if c.cmd == "WORKDIR"]
    assert workdir == [cfg.image.workdir]
    env = {}
    for c in commands:
        if c.cmd == "ENV":  # BuildKit gives name, value, name, value, ...
            env.update(zip(c.value[::2], c.value[1::2], strict=True))
    assert env["DUET_CACHE_DIR"] == cfg.image.cache_dir


def test_the_install_step_comparison_sees_a_drift():
    make = ['@$(BIN)/pip install -q -e ".[dev]" 2>&1 | $(PIPQ)']
    assert _install_steps(make, {}) != _install_steps(['.venv/bin/pip install -e "."'], {})


# --- joining Ray by address with token authentication --------------------------------


@pytest.fixture
def clean_ray_auth(monkeypatch, tmp_path):
    """No auth env, and a HOME without ~/.ray/auth_token."""
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        # setenv first, so that whatever the code under test sets is undone afterwards.
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def test_joining_by_address_sends_a_configured_token(clean_ray_auth, monkeypatch):
    from core import ray_setup

    assert ray_setup.join_auth_mode() is None  # nothing configured: Ray's default
    token = clean_ray_auth / "token"
    token.write_text("abc123")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    assert ray_setup.join_auth_mode() == "token"
    ray_setup.quiet_ray_environment(local=False)
    import os

    assert os.environ["RAY_AUTH_MODE"] == "token"
    # The token itself never travels in a job's runtime environment.
    monkeypatch.setenv("RAY_AUTH_TOKEN", "abc123")
    assert not any(k.startswith("RAY_AUTH") for k in ray_setup.forwarded_env())


def test_default_token_file_and_env_token_count(clean_ray_auth, monkeypatch):
    from core import ray_setup

    default = Path(clean_ray_auth / "home" / ".ray" / "auth_token")
    default.parent.mkdir(parents=True)
    default.write_text("from-ray-start\n")
    assert ray_setup.auth_token_source() == str(default)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert ray_setup.auth_token_source() == "RAY_AUTH_TOKEN"


def test_token_mode_without_a_token_fails_clearly(clean_ray_auth, monkeypatch):
    from core import ray_setup

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(ray_setup.RayAuthError, match="no token"):
        ray_setup.join_auth_mode()
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(clean_ray_auth / "missing"))
    with pytest.raises(ray_setup.RayAuthError, match="no token in that file"):
        ray_setup.join_auth_mode()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    assert ray_setup.join_auth_mode() == "disabled"


# --- make down stops exactly what make up started -------------------------------------


def test_stopping_the_stack_takes_its_process_trees_and_nothing_else(tmp_path):
    """A recorded service with a child that ignores SIGTERM and an orphaned grandchild
    goes entirely; an unrelated process started the same way stays."""
    import os
    import subprocess
    import time

    from infra.stack import _alive, _stop_processes

    script = "trap '' TERM; (trap '' TERM; sleep 300) & sleep 300 & wait"
    ours = subprocess.Popen(["bash", "-c", script], start_new_session=True)
    other = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        time.sleep(0.5)
        children = [
            int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == ours.pid
        ]
        assert len(children) == 2
        state = {"processes": {"svc": {"pid": ours.pid, "pgid": ours.pid}}}
        stopped = _stop_processes(state, log=lambda *_: None, grace_s=1.0)
        ours.wait(timeout=5)
        assert set(children) | {ours.pid} <= set(stopped)
        assert not any(_alive(p) for p in children)
        assert _alive(other.pid) and other.pid not in stopped
    finally:
        other.kill()
        other.wait()
        ours.kill()


def test_stopping_the_stack_signals_rays_gcs_after_everything_else(tmp_path):
    """Serve's controller, proxy and replicas wait on Ray's GCS while they exit: with the
    GCS signalled at the same moment they ignored SIGTERM and `make down` waited its whole
    grace. The GCS (a process named gcs_server) gets SIGTERM once the rest is gone, as
    `ray stop` does it, and nothing needs SIGKILL."""
    import subprocess
    import sys
    import time

    from infra.stack import _alive, _stop_processes

    gone = tmp_path / "worker-gone"
    seen = tmp_path / "gcs-saw"
    (tmp_path / "gcs_server").write_text(
        "import signal, sys, time, pathlib\n"
        "def term(*_):\n"
        f"    pathlib.Path({str(seen)!r}).write_text(str(pathlib.Path({str(gone)!r}).exists()))\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, term)\n"
        "time.sleep(300)\n"
    )
    (tmp_path / "worker.py").write_text(
        "import signal, sys, time, pathlib\n"
        "def term(*_):\n"
        "    time.sleep(0.5)  # an orderly exit takes a moment\n"
        f"    pathlib.Path({str(gone)!r}).touch()\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, term)\n"
        "time.sleep(300)\n"
    )
    py = sys.executable
    script = f"{py} {tmp_path / 'gcs_server'} & {py} {tmp_path / 'worker.py'} & wait"
    head = subprocess.Popen(["bash", "-c", script], start_new_session=True)
    try:
        time.sleep(1.0)
        state = {"processes": {"ray": {"pid": head.pid, "pgid": head.pid}}}
        lines: list[str] = []
        t0 = time.monotonic()
        stopped = _stop_processes(state, log=lines.append, grace_s=10.0)
        assert time.monotonic() - t0 < 8.0, lines
        assert seen.read_text() == "True", "the GCS was signalled before the worker was gone"
        assert not lines, lines  # nothing was killed
        assert len(stopped) == 3 and not any(_alive(p) for p in stopped)
    finally:
        head.kill()
        head.wait()


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


@contextlib.contextmanager
def _listening_port():
    """A port something listens on, so the reachability check passes and the (patched)
    join itself is what refuses."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


def test_a_refused_join_says_which_token_to_set(clean_ray_auth, monkeypatch):
    """Ray reports a cluster refusing a token-less driver only as a failed connection."""
    import ray

    from core import ray_setup

    def refuse(**_):
        raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:6379")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda address=None, **kw: refuse())
    with _listening_port() as port, pytest.raises(ConnectionError, match="RAY_AUTH_TOKEN_PATH"):
        ray_setup.init_ray(f"127.0.0.1:{port}")


def test_a_refused_token_says_where_it_came_from(clean_ray_auth, monkeypatch):
    import ray

    from core import ray_setup

    token = clean_ray_auth / "stale_token"
    token.write_text("not-the-clusters")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))

    def refuse(**_):
        raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:6379")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda address=None, **kw: refuse())
    with (
        _listening_port() as port,
        pytest.raises(ConnectionError, match="sent the token from RAY_AUTH_TOKEN_PATH"),
    ):
        ray_setup.init_ray(f"127.0.0.1:{port}")


def test_a_local_ray_that_timed_out_starting_is_started_again(monkeypatch):
    """Ray's raylet gets a fixed 30 s to register; on a busy machine that can pass."""
    import ray

    from core import ray_setup

    calls, leftovers = [], []

    def init(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1:  # the failed attempt leaves its processes behind, as Ray's does
            leftovers.append(
                subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            )
            raise Exception("The current node timed out during startup. This could happen")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_setup.init_ray(None, num_cpus=1) is True
    assert len(calls) == 2 and calls[1]["address"] == "local" and calls[1]["num_cpus"] == 1
    assert leftovers[0].poll() is not None, "the failed attempt's processes were left running"

    calls.clear()
    monkeypatch.setattr(ray_setup, "LOCAL_START_ATTEMPTS", 1)
    with pytest.raises(Exception, match="timed out during startup"):
        ray_setup.init_ray(None)
    leftovers[-1].kill()

    def broken(**_):
        raise ValueError("num_cpus must be positive")

    monkeypatch.setattr(ray, "init", broken)
    with pytest.raises(ValueError):  # other errors are not retried
        ray_setup.init_ray(None)


def _stack_config(tmp_path, listen_port):
    from infra.config import load_deploy_config

    ports = {name: listen_port() for name in ("gcs", "dash", "client", "s3", "prefect")}
    config = tmp_path / "stack.toml"
    config.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        f"[ray]\ngcs_port = {ports['gcs']}\ndashboard_port = {ports['dash']}\n"
        f"client_port = {ports['client']}\nnum_cpus = 1\n"
        f"[s3]\nport = {ports['s3']}\n[prefect]\nport = {ports['prefect']}\n"
    )
    return load_deploy_config(str(config))


def _ray_failing_once(tmp_path, message: str) -> str:
    """A `ray` that prints ``message`` and exits 1 the first time, then is the real one."""
    import stat
    import sys

    marker, wrapper = tmp_path / "ray-failed-once", tmp_path / "ray"
    real = Path(sys.executable).parent / "ray"
    wrapper.write_text(
        f'#!/bin/sh\nif [ ! -e "{marker}" ]; then touch "{marker}"; '
        f'echo "Exception: {message}" >&2; exit 1; fi\nexec "{real}" "$@"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    return str(wrapper)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_up_starts_the_ray_head_again_when_its_node_registration_timed_out(
    tmp_path, monkeypatch, listen_port
):
    """`ray start` gives the raylet a fixed 30 s to register; a busy machine can miss it
    (seen in `make test`, twice in a row once in CI): `up` starts the head again, up to
    RAY_START_ATTEMPTS starts in all, and only for that.
    (The head's start as `up` runs it; the whole of `up` is tests/test_stack_e2e.py's.)"""
    import infra.stack as stack

    real_bin = stack._bin

    def head(folder: Path, message: str) -> tuple[list[str], bool]:
        cfg = _stack_config(folder, listen_port)
        fake = _ray_failing_once(folder, message)
        monkeypatch.setattr(stack, "_bin", lambda name: fake if name == "ray" else real_bin(name))
        launch, lines = stack._new_launch(cfg), []
        try:
            stack._start_ray_head(cfg, launch, lines.append)
            return lines, stack._port_open(cfg.ray.host, cfg.ray.dashboard_port)
        except stack.StackError as err:
            return [*lines, str(err)], False
        finally:
            stack._stop_processes(launch.state, log=lines.append)

    lines, serving = head(tmp_path, "The current node timed out during startup. This ...")
    assert any("starting it again" in line for line in lines), lines
    assert serving, lines
    other = tmp_path / "other"
    other.mkdir()
    lines, serving = head(other, "some other failure")
    assert any("some other failure" in line for line in lines), lines
    assert not any("starting it again" in line for line in lines), lines
    assert not serving


def test_a_port_that_answers_something_other_than_http_is_not_ready():
    """`make up` waits for Prefect's /health; in one fresh-clone run one of Ray's own
    gRPC services had taken the port the stack was given for Prefect, answered the
    probe with binary frames, and `make up` died with a traceback (BadStatusLine)
    instead of waiting for Prefect's process to say what was wrong. Not HTTP: not
    ready. (Prefect now also starts before Ray, so Ray cannot take its port.)"""
    import threading

    from infra.stack import _http_ok

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]

        def answer_binary():
            conn, _ = server.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00@@@\x00\x03\n")

        thread = threading.Thread(target=answer_binary, daemon=True)
        thread.start()
        assert _http_ok(f"http://127.0.0.1:{port}/health") is False
        thread.join(timeout=5)
