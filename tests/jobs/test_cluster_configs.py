"""cluster/: the launcher YAML against the schema inside the installed ray, the KubeRay manifests'
fields, the image they run, and the local head script's interface."""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

import jepa_ray
from jepa_ray.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
SCHEMA = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def _launcher() -> dict:
    return yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())


def test_launcher_yaml_validates_against_rays_schema_and_rays_own_checks():
    cfg = _launcher()
    jsonschema.validate(cfg, SCHEMA)
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))  # with Ray's AWS defaults merged in
    broken = copy.deepcopy(cfg)
    del broken["available_node_types"]["gpu.a100x8"]["resources"]
    with pytest.raises(jsonschema.ValidationError, match="'resources' is a required property"):
        jsonschema.validate(broken, SCHEMA)


def test_launcher_yaml_node_types_pins_and_no_credentials():
    cfg = _launcher()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the head runs drivers, not data tasks or trainers
    assert types["gpu.a100x8"]["node_config"]["InstanceType"].startswith(("p4d", "p5", "g5", "g6"))
    assert types["cpu.spot"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    for t in types.values():  # S3 through instance roles
        assert t["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
    text = (CLUSTER / "aws-gpu.yaml").read_text()
    assert not re.search(r"AKIA[0-9A-Z]{12}|aws_secret_access_key|aws_access_key_id", text, re.I)
    # the version installed is pinned to this package's and the images to the installed Ray
    setup = " ".join(cfg["setup_commands"])
    assert f'= "{jepa_ray.__version__}"' in setup and "-c /home/ray/jepa-ray/constraints.txt" in setup
    assert "torch==2.13.0" in setup
    for image in (cfg["docker"]["image"], cfg["docker"]["head_image"]):
        assert image.startswith(f"rayproject/ray:{ray.__version__}-py311-")
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert "RAY_AUTH_MODE=token" in " ".join(cfg["worker_start_ray_commands"])
    assert cfg["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"


def _manifests(name: str) -> dict[str, dict]:
    docs = list(yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()))
    return {d["kind"]: d for d in docs}


def _check_cluster_spec(spec: dict, pvcs: set[str]) -> list[str]:
    """What every jepa-ray Ray cluster on Kubernetes needs; returns the mounted paths."""
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"  # reached by kubectl port-forward, not exposed
    assert head["rayStartParams"]["num-cpus"] == "0"
    gpu_groups = []
    pods = [head["template"]["spec"], *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        if "nvidia.com/gpu" in limits:
            gpu_groups.append(group)
            assert int(limits["nvidia.com/gpu"]) > 0
            assert group["rayStartParams"]["num-gpus"] == limits["nvidia.com/gpu"]
    assert gpu_groups, "no worker group with GPUs"
    mounts = []
    for pod in pods:
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        }
        assert set(claims.values()) <= pvcs and claims, "a pod without the shared checkpoint volume"
        container = pod["containers"][0]
        assert container["image"] == _image_tag()
        mounts += [m["mountPath"] for m in container["volumeMounts"] if m["name"] in claims]
    return mounts


def _image_tag() -> str:
    return f"registry.example.org/jepa-ray:{jepa_ray.__version__}"


def test_kuberay_raycluster_has_gpu_workers_shared_storage_and_token_auth():
    docs = _manifests("raycluster.yaml")
    assert docs["RayCluster"]["apiVersion"] == "ray.io/v1"
    pvc = docs["PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    mounts = _check_cluster_spec(docs["RayCluster"]["spec"], {pvc["metadata"]["name"]})
    assert set(mounts) == {"/mnt/jepa-ray"}


def test_kuberay_rayjob_runs_a_real_entrypoint_and_config_and_shuts_down():
    docs = _manifests("rayjob.yaml")
    job = docs["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(env, dict) and env["env_vars"]["PYTHONUNBUFFERED"] == "1"
    mounts = _check_cluster_spec(spec["rayClusterSpec"], {docs["PersistentVolumeClaim"]["metadata"]["name"]})
    # the entrypoint is a script of jobs/ with a config of jobs/configs/ that loads with its overrides
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and (ROOT / argv[1]).is_file() and argv[1].startswith("jobs/")
    config = argv[argv.index("--config") + 1]
    overrides = [a for a in argv[2:] if "=" in a and not a.startswith("-")]
    cfg = load_config(ROOT / config, overrides)
    assert cfg.train.use_gpu and cfg.train.storage_path.startswith(tuple(mounts))
    gpus = sum(
        int(g["replicas"]) * int(g["rayStartParams"]["num-gpus"])
        for g in spec["rayClusterSpec"]["workerGroupSpecs"]
    )
    assert gpus == cfg.train.num_workers  # one GPU per Ray Train worker, all of them present
    assert "--name" in argv  # a retried job (backoffLimit) resumes the same run


def test_dockerfile_builds_on_the_installed_ray_and_pins_like_ci():
    text = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in text
    assert "torch==2.13.0" in text and "-c constraints.txt" in text
    for path in ("jobs", "jepa_ray", "constraints.txt", "pyproject.toml"):
        assert path in text and (ROOT / path).exists()


def test_local_head_script_is_valid_shell_and_refuses_unknown_commands():
    script = CLUSTER / "local-head.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    out = subprocess.run([str(script), "restart"], capture_output=True, text=True)
    assert out.returncode == 2 and "usage:" in out.stderr
