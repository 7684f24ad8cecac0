"""The cluster manifests parse and say what infra/README.md promises: GPU workers with a GPU limit,
credentials only by reference (Secrets, instance profiles), never as literal values."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

INFRA = Path(__file__).resolve().parents[2] / "infra"
FILES = ["k8s/raycluster.yaml", "k8s/minio.yaml", "aws/cluster.yaml"]
SECRET_NAMES = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|ROOT_USER)", re.I)


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((INFRA / name).read_text()) if d is not None]


def walk(obj):
    """Every dict anywhere in a document."""
    if isinstance(obj, dict):
        yield obj
        for v in obj.values():
            yield from walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from walk(v)


@pytest.mark.parametrize("name", FILES)
def test_parses_and_sets_no_secret_literally(name):
    found = docs(name)
    assert found, name
    for d in found:
        for node in walk(d):
            if "name" in node and ("value" in node or "valueFrom" in node) and SECRET_NAMES.search(str(node["name"])):
                assert "value" not in node and "secretKeyRef" in node["valueFrom"], node  # from a Secret only
    text = (INFRA / name).read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)  # no AWS key id
    assert not re.search(r"(?i)(secret_access_key|password)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{8,}", text)
    assert not re.search(r"s3://[^/\s]*:[^@\s]*@", text)  # no credentials in a URI


def test_raycluster_has_head_and_gpu_workers_with_store_env():
    (rc,) = docs("k8s/raycluster.yaml")
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    (gpu,) = [g for g in rc["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    worker = gpu["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    for c in (head, worker):
        assert re.fullmatch(r"rayproject/ray:2\.\d+\.\d+-py311-gpu", c["image"])
        env = {e["name"]: e for e in c["env"]}
        assert env["RAYBRANCH_STORE"]["value"].startswith("s3://")
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "raybranch-s3", "key": key}
    assert rc["spec"]["rayVersion"] in head["image"]


def test_minio_has_deployment_service_pvc_and_bucket_job():
    kinds = {d["kind"]: d for d in docs("k8s/minio.yaml")}
    assert set(kinds) == {"PersistentVolumeClaim", "Deployment", "Service", "Job"}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == kinds["PersistentVolumeClaim"]["metadata"]["name"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in pod["containers"][0]["env"]}
    assert env == {"MINIO_ROOT_USER": "raybranch-s3", "MINIO_ROOT_PASSWORD": "raybranch-s3"}
    assert {p["port"] for p in kinds["Service"]["spec"]["ports"]} >= {9000}
    script = " ".join(kinds["Job"]["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "mc mb --ignore-existing store/raybranch" in script


def test_aws_launcher_uses_gpu_workers_instance_profile_and_s3():
    (cfg,) = docs("aws/cluster.yaml")
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["node_config"]["InstanceType"] == "m5.xlarge"
    gpu = types["ray.worker.gpu"]
    assert gpu["node_config"]["InstanceType"] == "g5.xlarge"
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] <= cfg["max_workers"]
    for t in types.values():
        assert t["node_config"]["IamInstanceProfile"]["Name"] == "raybranch-s3"
    assert any("pip install" in c and "raybranch" in c for c in cfg["setup_commands"])
    starts = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert "RAYBRANCH_STORE=s3://" in starts and "AWS_SECRET_ACCESS_KEY" not in starts
