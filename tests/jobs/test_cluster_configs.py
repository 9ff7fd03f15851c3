"""cluster/: the launcher YAML against the schema inside the installed ray, the KubeRay manifests'
fields, the image they run, what each pod may do and who may reach it, and the local head script's
interface."""

from __future__ import annotations

import copy
import importlib.util
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


def _scalars(value):
    """Every scalar of a parsed YAML document."""
    if isinstance(value, dict):
        for v in value.values():
            yield from _scalars(v)
    elif isinstance(value, list):
        for v in value:
            yield from _scalars(v)
    else:
        yield value


def test_launcher_nodes_join_one_security_group_of_ours_and_require_imdsv2():
    cfg = _launcher()
    types = cfg["available_node_types"]
    # every node type names the group cluster/aws-security-group.py makes; the launcher makes none
    assert "security_group" not in cfg["provider"]
    groups = {tuple(t["node_config"]["SecurityGroupIds"]) for t in types.values()}
    assert len(groups) == 1, groups
    (group,) = groups.pop()  # one group, a placeholder id until replaced by the script's
    assert re.fullmatch(r"sg-[0-9a-f]{17}", group)
    assert not {"0.0.0.0/0", "::/0"} & set(map(str, _scalars(cfg)))
    from ray.autoscaler._private.aws import config as aws_config

    assert aws_config._configure_security_group(copy.deepcopy(cfg)) == cfg  # left as it is
    # why: a group Ray creates admits SSH from anywhere, whatever provider.security_group adds
    narrow = [{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "203.0.113.0/24"}]}]
    rules = aws_config._create_default_inbound_rules({"sg-0"}, narrow)
    assert any(r.get("FromPort") == 22 and {"CidrIp": "0.0.0.0/0"} in r.get("IpRanges", []) for r in rules)
    # instance metadata (the role's credentials) only with a session token, on every node
    import botocore.session
    from botocore.validate import validate_parameters

    run_instances = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances")
    metadata_shape = run_instances.input_shape.members["MetadataOptions"].members
    for name, t in types.items():
        options = t["node_config"]["MetadataOptions"]
        assert options["HttpTokens"] == "required" and options["HttpEndpoint"] == "enabled", name
        assert 1 <= options["HttpPutResponseHopLimit"] <= 2, name  # 2: the Ray container is one hop
        for key in ("HttpTokens", "HttpEndpoint"):
            assert options[key] in metadata_shape[key].enum, (name, key)
        # the node_config is what Ray passes to ec2.create_instances: a valid RunInstances request
        validate_parameters({**t["node_config"], "MinCount": 1, "MaxCount": 1}, run_instances.input_shape)


def _security_group_script():
    spec = importlib.util.spec_from_file_location("aws_security_group", CLUSTER / "aws-security-group.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_security_group_script_opens_ssh_to_one_network_and_the_cluster_to_itself(capsys):
    import boto3
    from moto import mock_aws

    sg = _security_group_script()
    for wide in ("0.0.0.0/0", "::/0", "10.0.0.0/7", "2001:db8::/31", "198.51.100.7/24", "not-a-network"):
        assert sg.main(["--ssh-cidr", wide]) == 2, wide  # refused before any AWS call
        assert "--ssh-cidr" in capsys.readouterr().err
    cidr = "198.51.100.7/32"
    with mock_aws():
        assert sg.main(["--ssh-cidr", cidr]) == 0
        out = capsys.readouterr().out
        group_id = re.search(r"\((sg-[0-9a-f]+)\)", out).group(1)
        assert f"SecurityGroupIds: &security-groups [{group_id}]" in out
        ec2 = boto3.client("ec2", region_name=_launcher()["provider"]["region"])
        (group,) = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
        assert sg.rule_set(group["IpPermissions"]) == {("-1", None, None, group_id), ("tcp", 22, 22, cidr)}
        # run again: the same group, found and checked, not changed
        assert (
            sg.main(["--ssh-cidr", cidr]) == 0
            and f"found (rules as expected): security group jepa-ray ({group_id})" in capsys.readouterr().out
        )
        # a group of that name with any other rule is refused, and left as it is
        wide = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
        ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[wide])
        assert sg.main(["--ssh-cidr", cidr]) == 2
        assert "0.0.0.0/0" in capsys.readouterr().err
        (group,) = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
        assert len(sg.rule_set(group["IpPermissions"])) == 3


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
        mounts += [m["mountPath"] for m in container["volumeMounts"] if m["name"] in claims]
    return mounts


# the image by digest: a placeholder digest to replace with the built image's, never a bare tag
IMAGE = re.compile(
    rf"registry\.example\.org/jepa-ray:{re.escape(jepa_ray.__version__)}@sha256:[0-9a-f]{{64}}"
)
UID, GID = 1000, 100  # `ray` and `users` in rayproject/ray images (cluster/Dockerfile's USER)
MANIFESTS = ("raycluster.yaml", "rayjob.yaml")


def _cluster(name: str) -> dict:
    doc = _manifests(name)
    return doc["RayCluster"]["spec"] if "RayCluster" in doc else doc["RayJob"]["spec"]["rayClusterSpec"]


def _groups(spec: dict) -> list[dict]:
    """The head group and the worker groups of a RayCluster spec."""
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]]


def _pod_templates(name: str) -> dict[str, dict]:
    """Every pod template of a manifest (head, worker groups, the RayJob's submitter), by role."""
    doc = _manifests(name)
    spec = _cluster(name)
    pods = {"head": spec["headGroupSpec"]["template"]}
    pods |= {f"worker {g['groupName']}": g["template"] for g in spec["workerGroupSpecs"]}
    if "RayJob" in doc:
        pods["submitter"] = doc["RayJob"]["spec"]["submitterPodTemplate"]
    return pods


def _check_container_security(sc: dict, where: str) -> None:
    assert sc["allowPrivilegeEscalation"] is False, where  # no setuid (the image's sudo) either
    assert sc["capabilities"] == {"drop": ["ALL"]}, where
    assert not sc.get("privileged") and sc["readOnlyRootFilesystem"] is False, where
    assert "runAsUser" not in sc or sc["runAsUser"] != 0, where


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_pods_run_as_the_images_user_without_privileges_or_api_token(name):
    pods = _pod_templates(name)
    assert len(pods) >= 3
    for role, template in pods.items():
        pod = template["spec"]
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and (sc["runAsUser"], sc["runAsGroup"]) == (UID, GID), role
        assert sc["fsGroup"] == GID and sc["seccompProfile"] == {"type": "RuntimeDefault"}, role
        assert pod["automountServiceAccountToken"] is False, role
        assert pod.get("initContainers", []) == [] and not pod.get("hostNetwork") and not pod.get("hostPID")
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert not any("hostPath" in v for v in volumes.values()), role
        for container in pod["containers"]:
            where = f"{name} {role} {container['name']}"
            _check_container_security(container["securityContext"], where)
            assert IMAGE.fullmatch(container["image"]), where
            # the root filesystem stays writable (Ray cannot run otherwise): Ray's /tmp is an emptyDir
            tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert len(tmp) == 1 and volumes[tmp[0]["name"]] == {"name": tmp[0]["name"], "emptyDir": {}}, (
                where
            )
            assert not any(m["mountPath"].startswith("/var/run/secrets") for m in container["volumeMounts"])
    # one image everywhere, and the file says what to put in place of the placeholder digest
    assert len({c["image"] for t in pods.values() for c in t["spec"]["containers"]}) == 1
    text = (CLUSTER / "kuberay" / name).read_text()
    assert "replace the digest" in text and "docker inspect --format '{{index .RepoDigests 0}}'" in text


def test_kuberay_autoscaler_alone_holds_the_api_token():
    spec = _cluster("raycluster.yaml")
    assert spec["enableInTreeAutoscaling"] is True
    options = spec["autoscalerOptions"]
    _check_container_security(options["securityContext"], "autoscaler")
    head = spec["headGroupSpec"]["template"]["spec"]
    assert head["automountServiceAccountToken"] is False
    (mount,) = options["volumeMounts"]
    # where Ray's KubeRay node provider reads its token and CA (ray.autoscaler._private.kuberay)
    from ray.autoscaler._private.kuberay import node_provider

    assert mount["mountPath"] == str(Path(node_provider.IN_CLUSTER_TOKEN_PATH).parent) and mount["readOnly"]
    assert Path(node_provider.IN_CLUSTER_CA_CERT_PATH).parent == Path(mount["mountPath"])
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    sources = {k for s in volume["projected"]["sources"] for k in s}
    assert sources == {"serviceAccountToken", "configMap", "downwardAPI"}
    token = next(
        s["serviceAccountToken"] for s in volume["projected"]["sources"] if "serviceAccountToken" in s
    )
    assert token["path"] == Path(node_provider.IN_CLUSTER_TOKEN_PATH).name
    # the Ray container, where job drivers run, does not mount it
    assert all(m["name"] != mount["name"] for m in head["containers"][0]["volumeMounts"])
    # the RayJob's cluster has no autoscaler, hence no token anywhere
    assert not _cluster("rayjob.yaml").get("enableInTreeAutoscaling")


def test_dockerfile_user_is_the_one_the_pods_run_as():
    users = re.findall(r"^USER\s+(\S+)\s*$", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert users and users[-1] == f"{UID}:{GID}"


def _ray_ports(spec: dict) -> tuple[set[int], set[tuple[int, int]]]:
    """The ports a Ray cluster's pods listen on: fixed ones, and the workers' (min, max) ranges."""
    ports = {6379, 8265}  # GCS and dashboard: KubeRay's defaults, not in rayStartParams
    ranges = set()
    for group in _groups(spec):
        params = group["rayStartParams"]
        ports |= {int(v) for k, v in params.items() if k.endswith("-port") and "worker" not in k}
        ranges.add((int(params["min-worker-port"]), int(params["max-worker-port"])))
        for container in group["template"]["spec"]["containers"]:
            ports |= {p["containerPort"] for p in container.get("ports", [])}
    return ports, ranges


def _admits(policy: dict, labels: dict, port: int, same_namespace: bool = True) -> bool:
    """Whether a NetworkPolicy lets a pod with `labels` reach `port` on the pods it selects."""
    for rule in policy["spec"]["ingress"]:
        peers = rule.get("from")
        ports = rule.get("ports")
        peer_ok = peers is None or any(
            ("namespaceSelector" in p or same_namespace)
            and "ipBlock" not in p
            and p.get("podSelector", {}).get("matchLabels", {}).items() <= labels.items()
            for p in peers
        )
        port_ok = ports is None or any(p["port"] <= port <= p.get("endPort", p["port"]) for p in ports)
        if peer_ok and port_ok:
            return True
    return False


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_network_policy_lets_only_the_clusters_own_pods_reach_ray(name):
    policy = _manifests(name)["NetworkPolicy"]
    assert policy["apiVersion"] == "networking.k8s.io/v1" and "Ingress" in policy["spec"]["policyTypes"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    pods = _pod_templates(name)
    ray_pods = {role: t["metadata"]["labels"] for role, t in pods.items() if role != "submitter"}
    for role, labels in ray_pods.items():  # the policy covers every Ray pod
        assert selector.items() <= labels.items(), role
    own = dict(selector)
    for rule in policy["spec"]["ingress"]:  # no rule open to any source or on any port
        assert rule.get("from") and rule.get("ports"), rule
        assert not any("ipBlock" in peer for peer in rule["from"]), rule
    ports, ranges = _ray_ports(_cluster(name))
    assert {6379, 8265, 10001} <= ports and ranges == {(10002, 19999)}
    # the cluster's pods reach every port Ray listens on ...
    listed = {(p["port"], p.get("endPort", p["port"])) for r in policy["spec"]["ingress"] for p in r["ports"]}
    assert {(p, p) for p in ports} | ranges <= listed
    for port in (*ports, 10002, 15000, 19999):
        assert _admits(policy, own, port), port
    # ... and nothing else does: another app's pod, another namespace's, the metrics port, beyond the range
    for port in (*ports, 10002, 19999):
        assert not _admits(policy, {"app": "other"}, port)
        assert not _admits(policy, own, port, same_namespace=False)
    for port in (8080, 22, 20000, 10000):
        assert not _admits(policy, own, port), port
    if "submitter" in pods:  # the RayJob's submitter and the operator: the job API only
        submitter = pods["submitter"]["metadata"]["labels"]
        assert not submitter.items() >= selector.items()  # not a Ray pod
        assert _admits(policy, submitter, 8265) and not _admits(policy, submitter, 6379)
        operator = {"app.kubernetes.io/component": "kuberay-operator"}
        assert _admits(policy, operator, 8265, same_namespace=False)
        assert not any(_admits(policy, operator, p, same_namespace=False) for p in ports - {8265})
    # the label names this cluster, so two clusters in one namespace do not reach each other
    owner = next(d for kind, d in _manifests(name).items() if kind in ("RayCluster", "RayJob"))
    assert selector == {"jepa-ray/cluster": owner["metadata"]["name"]}


def test_kuberay_salt_secret_is_a_read_only_file_on_the_head_only():
    spec = _cluster("raycluster.yaml")
    head = spec["headGroupSpec"]["template"]["spec"]
    (volume,) = [v for v in head["volumes"] if "secret" in v]
    secret = volume["secret"]
    assert secret["secretName"] == "jepa-ray-salt" and secret["items"] == [{"key": "salt", "path": "salt"}]
    assert secret["defaultMode"] == 0o400
    # with 0400 the file is root's: fsGroup gives it to the pod's group (0440), so uid 1000 reads it
    assert head["securityContext"]["fsGroup"] == head["securityContext"]["runAsGroup"]
    (mount,) = [m for m in head["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
    salt_file = f"{mount['mountPath']}/{secret['items'][0]['path']}"
    # prepare's driver runs on the head; Ray tasks get pseudonyms, never the salt: no worker mounts it
    for group in spec["workerGroupSpecs"]:
        assert not any("secret" in v for v in group["template"]["spec"]["volumes"]), group["groupName"]
    for name in MANIFESTS:
        for role, template in _pod_templates(name).items():
            for container in template["spec"]["containers"]:
                env = {e["name"] for e in container.get("env", [])}
                assert "JEPA_RAY_SALT" not in env, (name, role)  # never an environment variable
    # the file's usage creates that Secret and points prepare at that file; the override loads
    text = (CLUSTER / "kuberay" / "raycluster.yaml").read_text()
    assert "kubectl create secret generic jepa-ray-salt --from-file=salt=" in text
    assert "jepa-ray salt new " in text
    override = re.search(r"(prepare\.deid\.salt_file=\S+)", text).group(1)
    assert override == f"prepare.deid.salt_file={salt_file}"
    assert load_config(None, [override]).prepare.deid.salt_file == salt_file


def test_kuberay_images_are_pinned_by_digest():
    for name in MANIFESTS:
        text = (CLUSTER / "kuberay" / name).read_text()
        images = re.findall(r"^\s*image:\s*(?:&\S+\s+)?(\S+)", text, re.M)
        assert images and all(IMAGE.fullmatch(i) or i.startswith("*") for i in images), images


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
