"""The deploy manifests keep Ray's control plane off the cluster network: every Ray pod template carries the
label the NetworkPolicy selects, and only the Serve port is open to other pods."""
from pathlib import Path

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
