"""The deploy manifests keep Ray's control plane off the cluster network: every Ray pod template carries the
label the NetworkPolicy selects, and only the Serve port is open to other pods."""
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _pod_templates(obj: dict) -> list[dict]:
    spec = obj["spec"]
    cluster = spec.get("rayClusterConfig") or spec.get("rayClusterSpec")
    groups = [cluster["headGroupSpec"]] + list(cluster.get("workerGroupSpecs", []))
    return [g["template"] for g in groups]


def test_every_ray_pod_is_selected_by_the_network_policy_and_only_serve_is_public():
    policy = yaml.safe_load((DEPLOY / "networkpolicy.yaml").read_text())
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for name in ("rayservice.yaml", "rayjob-add-task.yaml"):
        obj = yaml.safe_load((DEPLOY / name).read_text())
        for template in _pod_templates(obj):
            labels = template.get("metadata", {}).get("labels", {})
            assert selector.items() <= labels.items(), (name, labels)
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        sources = rule.get("from")
        if sources is None:  # open to every pod of the cluster
            assert ports == {8000}, rule
        elif not ports:  # every port: only cl-serve's own Ray pods
            assert sources == [{"podSelector": {"matchLabels": selector}}], rule
        else:  # the operator: dashboard / agent / serve only
            assert ports <= {8265, 52365, 8000} and all(
                s["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"} for s in sources)
    job = yaml.safe_load((DEPLOY / "rayjob-add-task.yaml").read_text())
    assert job["spec"]["submissionMode"] == "HTTPMode"  # no submitter pod that would need the job API


def test_manifests_schedule_and_clean_up_as_documented():
    svc = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())
    cluster = svc["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replica on the head
    assert cluster["enableInTreeAutoscaling"] is True
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert serve_cfg["autoscaling"]["max_replicas"] > serve_cfg["autoscaling"]["min_replicas"] >= 1
    for template in _pod_templates(svc):
        assert "readinessProbe" not in template["spec"]["containers"][0]  # KubeRay's own probes stay
        assert template["spec"]["securityContext"]["fsGroup"] == 1000
        assert "serve" in template["spec"]["containers"][0]["image"]
    job = yaml.safe_load((DEPLOY / "rayjob-add-task.yaml").read_text())
    assert job["spec"]["ttlSecondsAfterFinished"] <= 600 and job["spec"]["shutdownAfterJobFinishes"]
    gpu = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    spec = gpu["template"]["spec"]
    assert spec["tolerations"] and spec["nodeSelector"] and "train" in spec["containers"][0]["image"]
    workers = int(job["spec"]["entrypoint"].split("--workers")[1].split()[0])
    assert workers == gpu["replicas"] and "--gpus-per-worker 1" in job["spec"]["entrypoint"]
    pvc = yaml.safe_load((DEPLOY / "store-pvc.yaml").read_text())
    assert pvc["spec"]["storageClassName"]
    boot = yaml.safe_load((DEPLOY / "bootstrap-job.yaml").read_text())
    assert boot["spec"]["template"]["spec"]["containers"][0]["command"][:2] == ["cl-serve", "init"]


def test_app_builder_accepts_the_rayservice_arguments(tmp_path):
    from cl_serve.server import app_builder

    svc = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())
    args = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["args"]
    app = app_builder({**args, "store": str(tmp_path)})
    deployment = app._bound_deployment
    assert deployment._deployment_config.autoscaling_config.max_replicas == args["autoscaling"]["max_replicas"]
    assert deployment._deployment_config.user_config["max_queued_requests"] == args["max_queued_requests"]


@pytest.mark.parametrize("version", ["1.30.0", "1.37.0"])
def test_builtin_objects_validate_against_the_kubernetes_schemas_offline(version):
    """PVC, bootstrap Job and NetworkPolicy against kubernetes-validate's bundled (offline) strict schemas. The
    RayService and RayJob are checked by the tests above, not against KubeRay's CRD schemas (not vendored: see
    the README's deployment section)."""
    import kubernetes_validate

    for name in ("store-pvc.yaml", "bootstrap-job.yaml", "networkpolicy.yaml"):
        for obj in yaml.safe_load_all((DEPLOY / name).read_text()):
            kubernetes_validate.validate(obj, version, strict=True)  # raises ValidationError on any violation
    bad = yaml.safe_load((DEPLOY / "networkpolicy.yaml").read_text())
    bad["spec"]["ingress"][0]["from"][0]["podSelectr"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, version, strict=True)
