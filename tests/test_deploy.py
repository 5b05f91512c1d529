"""The deploy overlays render with kustomize and every rendered object validates offline (Kubernetes kinds against
the strict Kubernetes schemas, RayService/RayJob against KubeRay's upstream v1.4.2 and v1.7.0 CRDs with no pruned
field, names as the API server checks them, serveConfigV2 against Ray Serve's schema, every cl-serve command line
against cl-serve's parser); the operator's behaviour the product relies on, written from KubeRay's code; and the
rendered objects do what the README's walkthrough relies on."""
import copy

import jsonschema
import pytest
import yaml

from tests.kube_manifests import (K8S_VERSIONS, KUBERAY_VERSIONS, OVERLAYS, check_cli, check_names,
                                  cl_serve_command_lines, crds_missing, kustomize_missing, render, validate_kuberay,
                                  validate_object, validate_serve_config)

NAMES = [p.name for p in OVERLAYS]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    reason = kustomize_missing()
    if reason:
        pytest.skip(f"cannot render the overlays: {reason} (install kubectl >= 1.21)")
    reason = crds_missing()
    if reason:
        pytest.skip(f"no upstream KubeRay CRDs to validate against: {reason}")
    return {p.name: render(p) for p in OVERLAYS}


def _one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [o["kind"] for o in objects])
    return found[0]


def _pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(where, pod template) of every workload object: a Job's or StatefulSet's template, each Ray group's."""
    if obj["kind"] in ("Job", "StatefulSet"):
        return [(obj["metadata"]["name"], obj["spec"]["template"])]
    if obj["kind"] in ("RayService", "RayJob"):
        return [(f"{obj['metadata']['name']}/{g.get('groupName', 'head')}", g["template"]) for g in _groups(obj)]
    return []


def _groups(obj: dict) -> list[dict]:
    cluster = obj["spec"].get("rayClusterConfig") or obj["spec"].get("rayClusterSpec")
    return [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]


def _containers(obj: dict) -> list[dict]:
    if obj["kind"] == "Job":
        return obj["spec"]["template"]["spec"]["containers"]
    return [c for g in _groups(obj) for c in g["template"]["spec"]["containers"]]


def test_the_four_overlays_exist():
    assert NAMES == ["cpu-object-store", "cpu-volume", "gpu-object-store", "gpu-volume"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", NAMES)
def test_every_rendered_object_validates_offline(rendered, overlay, version):
    kinds = sorted(o["kind"] for o in rendered[overlay])
    volume = ["PersistentVolumeClaim"] if overlay.endswith("volume") else []
    assert kinds == sorted(["ConfigMap", "Job", "NetworkPolicy", "RayJob", "RayService", *volume,
                            *["ServiceAccount"] * 5, "PodDisruptionBudget",  # one per workload, and Redis's
                            "Service", "StatefulSet", "NetworkPolicy"])  # GCS fault tolerance: Redis
    for obj in rendered[overlay]:
        validate_object(obj, version)


@pytest.mark.parametrize("mistake, message", [
    (lambda s: s["spec"].update(rayClusterConfg=s["spec"].pop("rayClusterConfig")), "rayClusterConf"),
    (lambda s: s["spec"].update(serveConfigV3=""), "pruned by the API server"),
    (lambda s: s["spec"]["rayClusterConfig"]["headGroupSpec"].update(rayStartParam={}), "rayStartParam"),
    (lambda s: s["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "is not of type 'string'"),
    (lambda s: s["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].pop("groupName"), "groupName"),
    (lambda s: s["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
     .update(resource={}), "pruned by the API server"),
    (lambda s: s["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
     .update(image=7), "is not of type 'string'"),
    (lambda s: s["spec"]["rayClusterConfig"].update(enableInTreeAutoscaling="yes"), "is not of type 'boolean'"),
])
@pytest.mark.parametrize("kuberay", KUBERAY_VERSIONS)
def test_the_upstream_crds_catch_mistakes(rendered, mistake, message, kuberay):
    """Each of these renders fine and would be pruned or refused by a cluster: the upstream CRD refuses it."""
    service = copy.deepcopy(_one(rendered["cpu-volume"], "RayService"))
    validate_kuberay(service, kuberay)
    mistake(service)
    with pytest.raises(jsonschema.ValidationError) as e:
        validate_kuberay(service, kuberay)
    assert message in str(e.value)


def test_names_are_checked_as_the_api_server_does(rendered):
    pvc = copy.deepcopy(_one(rendered["cpu-volume"], "PersistentVolumeClaim"))
    check_names(pvc)
    pvc["spec"]["storageClassName"] = "CHANGE-ME-rwx-class"  # the placeholder main had: not a valid class name
    with pytest.raises(ValueError, match="storageClassName 'CHANGE-ME-rwx-class' is not a valid name"):
        check_names(pvc)
    job = copy.deepcopy(_one(rendered["cpu-volume"], "RayJob"))
    job["metadata"]["labels"]["cl-serve.io/stage"] = "add task!"
    with pytest.raises(ValueError, match="not a valid label value"):
        check_names(job)


# --- what the KubeRay operator does with the objects (from its code at v1.4.2 and v1.7.0) -----------------------
# ray-operator/controllers/ray/common/service.go, getServicePorts / getPortsFromCluster: the head Service carries
# the ports declared on the head's Ray container (its name; an unnamed port becomes "<port>-port"); KubeRay's
# defaults (client 10001, gcs-server 6379, dashboard 8265, serve 8000) apply only when that list is empty, and
# "metrics" 8080 is added when missing. ray-operator/controllers/ray/utils/util.go, FetchHeadServiceURL(..,
# "dashboard"): the RayService controller (rayservice_controller.go, reconcileServe -> updateServeDeployment) and the
# RayJob controller in HTTPMode reach the dashboard through the head Service port named "dashboard", and fail with
# "dashboard port is not found" without it: serveConfigV2 is then never submitted.
KUBERAY_DEFAULT_PORTS = {"client": 10001, "gcs-server": 6379, "dashboard": 8265, "serve": 8000, "metrics": 8080}


def head_service_ports(cluster_spec: dict) -> dict[str, int]:
    container = cluster_spec["headGroupSpec"]["template"]["spec"]["containers"][0]  # FindRayContainerIndex: 0
    ports = {p.get("name") or f"{p['containerPort']}-port": p["containerPort"] for p in container.get("ports", [])}
    if not ports:
        ports = {k: v for k, v in KUBERAY_DEFAULT_PORTS.items() if k != "metrics"}
    ports.setdefault("metrics", 8080)
    return ports


def dashboard_url(service_name: str, ports: dict[str, int]) -> str:
    if "dashboard" not in ports:
        raise LookupError("dashboard port is not found")
    return f"{service_name}:{ports['dashboard']}"


@pytest.mark.parametrize("overlay", NAMES)
def test_the_operator_finds_every_head_port_it_needs(rendered, overlay):
    for obj in (_one(rendered[overlay], "RayService"), _one(rendered[overlay], "RayJob")):
        cluster = obj["spec"].get("rayClusterConfig") or obj["spec"]["rayClusterSpec"]
        ports = head_service_ports(cluster)
        assert dashboard_url("head-svc", ports) == "head-svc:8265"
        for name in ("gcs-server", "dashboard", "client", "metrics") + (("serve",) if obj["kind"] == "RayService" else ()):
            assert ports.get(name) == KUBERAY_DEFAULT_PORTS[name], (obj["kind"], name, ports)


def test_the_ports_main_declared_would_never_have_served():
    """main's head declared only serve and metrics: the operator built a head Service without a dashboard port."""
    cluster = {"headGroupSpec": {"template": {"spec": {"containers": [{"ports": [
        {"containerPort": 8000, "name": "serve"}, {"containerPort": 8080, "name": "metrics"}]}]}}}}
    with pytest.raises(LookupError, match="dashboard port is not found"):
        dashboard_url("head-svc", head_service_ports(cluster))


@pytest.mark.parametrize("overlay", NAMES)
def test_ray_is_sized_from_limits_equal_to_requests_and_pods_are_restricted(rendered, overlay):
    """KubeRay derives num-cpus / memory / num-gpus from the Ray container's limits (common/pod.go,
    generateRayStartCommand): requests equal to limits make the scheduler reserve what Ray believes it has.
    Every pod meets Pod Security 'restricted'."""
    for obj in rendered[overlay]:
        if obj["kind"] not in ("RayService", "RayJob", "Job"):
            continue
        groups = _groups(obj) if obj["kind"] != "Job" else [{"template": obj["spec"]["template"]}]
        for group in groups:
            pod = group["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            for c in pod["containers"]:
                assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
                if obj["kind"] != "Job":
                    assert c["resources"]["requests"] == c["resources"]["limits"], (obj["kind"], c["name"])
    svc = _one(rendered[overlay], "RayService")
    args = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["args"]
    workers = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    cpus = int(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert args["autoscaling"]["max_replicas"] <= workers["maxReplicas"] * cpus  # one CPU per replica: reachable


def test_a_broken_serve_config_or_job_is_refused(rendered):
    import kubernetes_validate
    from pydantic import ValidationError

    service = _one(rendered["cpu-volume"], "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    del config["applications"][0]["import_path"]
    with pytest.raises(ValidationError):
        validate_serve_config(yaml.safe_dump(config))
    job = copy.deepcopy(_one(rendered["cpu-volume"], "RayJob"))
    job["spec"]["submissionMode"] = "HttpMode"
    validate_kuberay(job, KUBERAY_VERSIONS[0])  # the CRD has no enum for it: the API server admits the typo ...
    with pytest.raises(ValueError, match="submissionMode 'HttpMode'"):  # ... and the operator refuses it later
        validate_object(job, K8S_VERSIONS[0])
    policy = copy.deepcopy(_one(rendered["cpu-volume"], "NetworkPolicy", "cl-serve-ray-control-plane"))
    policy["spec"]["ingress"][0]["from"][0]["podSelectr"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_object(policy, K8S_VERSIONS[0])


@pytest.mark.parametrize("overlay", NAMES)
def test_every_cl_serve_command_line_parses(rendered, overlay):
    """The bootstrap Job's and the RayJob's command lines, with the ConfigMap's variables and a task name, are
    valid cl-serve invocations; the store and inputs are the overlay's (bucket or volume)."""
    env = {**_one(rendered[overlay], "ConfigMap")["data"], "CL_SERVE_TASK": "week-47"}
    lines = cl_serve_command_lines(rendered[overlay], env)
    assert [argv[1] for argv in lines] == ["init", "add-task"]
    for argv in lines:
        check_cli(argv)
    init, add = lines
    scheme = "s3://" if overlay.endswith("object-store") else "/store/"
    assert init[init.index("--checkpoint") + 1].startswith(scheme) and env["CL_SERVE_STORE"].startswith(scheme[:-1])
    assert add[add.index("--data") + 1] == f"{env['CL_SERVE_INPUTS']}/incoming/week-47"
    workers = int(add[add.index("--workers") + 1])
    assert workers == _one(rendered[overlay], "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"]
    assert ("--gpus-per-worker" in add) == overlay.startswith("gpu")
    with pytest.raises(SystemExit):
        check_cli([*add, "--wrokers", "2"])


@pytest.mark.parametrize("overlay", NAMES)
def test_every_ray_pod_is_selected_by_the_network_policy_and_only_serve_is_public(rendered, overlay):
    objects = rendered[overlay]
    policy = _one(objects, "NetworkPolicy", "cl-serve-ray-control-plane")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for obj in (_one(objects, "RayService"), _one(objects, "RayJob")):
        for group in _groups(obj):
            labels = group["template"].get("metadata", {}).get("labels", {})
            assert selector.items() <= labels.items(), (obj["kind"], labels)
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        sources = rule.get("from")
        if sources is None:  # open to every pod of the cluster: Serve's HTTP port and the read-only metrics
            assert ports == {8000, 8080}, rule
        elif not ports:  # every port: only cl-serve's own Ray pods
            assert sources == [{"podSelector": {"matchLabels": selector}}], rule
        else:  # the operator: the dashboard only, from the operator's own namespace only (no pod label trusted)
            assert ports == {8265}, rule
            assert sources == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}}}]
    assert _one(objects, "RayJob")["spec"]["submissionMode"] == "HTTPMode"  # no submitter pod needs the job API


@pytest.mark.parametrize("overlay", NAMES)
def test_overlays_schedule_store_and_clean_up_as_documented(rendered, overlay):
    objects = rendered[overlay]
    stages = {o["kind"]: o["metadata"]["labels"]["cl-serve.io/stage"] for o in objects}
    assert stages["RayService"] == stages["NetworkPolicy"] == stages["ConfigMap"] == "serve"
    assert stages["Job"] == "bootstrap" and stages["RayJob"] == "add-task"
    svc, job = _one(objects, "RayService"), _one(objects, "RayJob")
    cluster = svc["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replica on the head
    assert cluster["enableInTreeAutoscaling"] is True
    args = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["autoscaling"]["max_replicas"] > args["autoscaling"]["min_replicas"] >= 1
    assert "store" not in args  # the replicas read $CL_SERVE_STORE from the ConfigMap
    for group in _groups(svc):
        assert group["template"]["spec"]["securityContext"]["fsGroup"] == 1000
        container = group["template"]["spec"]["containers"][0]
        assert "readinessProbe" not in container and "serve" in container["image"]  # KubeRay's own probes stay
    assert job["spec"]["ttlSecondsAfterFinished"] <= 600 and job["spec"]["shutdownAfterJobFinishes"]
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == cluster["rayVersion"]
    for obj in (svc, job, _one(objects, "Job")):
        for c in _containers(obj):
            if obj["kind"] != "RayJob" or c["name"] == "ray-head":  # the training workers never touch the store
                assert {"configMapRef": {"name": "cl-serve-config"}} in c["envFrom"], (obj["kind"], c["name"])
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    if overlay.startswith("gpu"):
        assert worker["tolerations"] and worker["nodeSelector"]
        assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    else:
        assert "nodeSelector" not in worker and "nvidia.com/gpu" not in str(worker)
    mounts = [c.get("volumeMounts") for o in (svc, job, _one(objects, "Job")) for c in _containers(o)]
    if overlay.endswith("object-store"):
        assert not any(mounts) and "PersistentVolumeClaim" not in stages
        assert {"secretRef": {"name": "cl-serve-object-store", "optional": True}} in _containers(svc)[0]["envFrom"]
    else:
        pvc = next(o for o in objects if o["kind"] == "PersistentVolumeClaim")
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"]["storageClassName"]
        assert all(m == [{"name": "store", "mountPath": "/store"}] for m in mounts if m is not None)


def test_app_builder_accepts_the_rayservice_arguments_and_reads_the_store_from_the_environment(
        rendered, tmp_path, monkeypatch):
    from cl_serve.serving.app import app_builder

    svc = _one(rendered["cpu-volume"], "RayService")
    args = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["args"]
    monkeypatch.delenv("CL_SERVE_STORE", raising=False)
    with pytest.raises(ValueError, match="CL_SERVE_STORE"):
        app_builder(args)
    monkeypatch.setenv("CL_SERVE_STORE", str(tmp_path))
    deployment = app_builder(args)._bound_deployment
    assert deployment.init_kwargs["store"] == str(tmp_path)
    assert deployment._deployment_config.autoscaling_config.max_replicas == args["autoscaling"]["max_replicas"]
    assert deployment._deployment_config.user_config["max_queued_requests"] == args["max_queued_requests"]


def test_the_rayjob_publishes_and_the_rayservice_config_serves_in_a_real_ray_cluster(rendered, tasks, tmp_path):
    """What KubeRay does with the manifests, on this machine: a Ray head started by `ray start` with the pods'
    environment (the ConfigMaps' CL_SERVE_STORE, CL_SERVE_INPUTS, CL_SERVE_TASK); the add-task RayJob's rendered
    entrypoint submitted verbatim to the dashboard's job API (HTTPMode): the shell expands the task folder, 2 Ray
    Train workers train, a version is published (without CL_SERVE_TASK the job fails and says how to set it); then
    the RayService's rendered serveConfigV2 PUT to the dashboard's Serve API, as the operator does, serves it."""
    import contextlib
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    import httpx

    from cl_serve.workflow import pipeline
    from cl_serve.serving.launch import free_ports
    from cl_serve.store.model_store import Store
    from tests.conftest import TINY, TINY_MODEL

    store = tmp_path / "store"
    pipeline.init_store(store, method={"name": "none"}, head={"name": "analytic", "projection": 64},
                        backbone=TINY_MODEL, timm_kwargs=TINY)
    inputs = tmp_path / "inputs"
    shutil.copytree(tasks[0]["train"], inputs / "incoming" / "week-47")
    entrypoint = _one(rendered["cpu-volume"], "RayJob")["spec"]["entrypoint"]
    flags = ("--port", "--node-manager-port", "--object-manager-port", "--ray-client-server-port",
             "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
             "--metrics-export-port")
    dashboard, serve_port, *drawn = free_ports(len(flags) + 2)  # distinct: two on one port kill `ray start`
    ports = [a for flag, port in zip(flags, drawn) for a in (flag, str(port))]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "CL_SERVE_STORE": str(store), "CL_SERVE_INPUTS": str(inputs),
           "CL_SERVE_TASK": "week-47", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("RAY_ADDRESS", None)
    ray_tmp = Path(tempfile.mkdtemp(prefix="clr-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    head_log = (tmp_path / "ray-head.log").open("w")
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         "--num-cpus=3", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         "--disable-usage-stats", f"--temp-dir={ray_tmp}", *ports],
        env=env, stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{dashboard}/api/jobs/"

    def run_job(text: str) -> tuple[str, str]:
        job = httpx.post(api, json={"entrypoint": text}, timeout=30).json()["submission_id"]
        deadline = time.time() + 600
        while time.time() < deadline:
            status = httpx.get(f"{api}{job}", timeout=30).json()["status"]
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status, httpx.get(f"{api}{job}/logs", timeout=30).json()["logs"]
            time.sleep(1)
        raise AssertionError("the job did not finish in 10 minutes")

    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(api, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline and head.poll() is None, \
                f"ray start did not bring up the job API: {(tmp_path / 'ray-head.log').read_text()[-2000:]}"
            time.sleep(1)
        status, logs = run_job(entrypoint)
        assert status == "SUCCEEDED", logs[-3000:]
        assert Store(store).current() == 1
        assert sorted(Store(store).manifest(1).labels) == sorted(tasks[0]["classes"])
        status, logs = run_job(f"unset CL_SERVE_TASK; {entrypoint}")
        assert status == "FAILED" and "no task: kubectl create configmap cl-serve-task" in logs, logs[-2000:]
        assert Store(store).current() == 1

        config = yaml.safe_load(_one(rendered["cpu-volume"], "RayService")["spec"]["serveConfigV2"])
        config["http_options"] = {"host": "127.0.0.1", "port": serve_port}  # KubeRay leaves it to Serve: 0.0.0.0:8000
        serve_api = f"http://127.0.0.1:{dashboard}/api/serve/applications/"
        assert httpx.put(serve_api, json=config, timeout=60).status_code == 200
        deadline, state = time.time() + 300, None
        while time.time() < deadline and state != "RUNNING":
            time.sleep(1)
            apps = httpx.get(serve_api, timeout=30).json().get("applications", {})
            state = apps.get("cl-serve", {}).get("status")
            assert state != "DEPLOY_FAILED", apps["cl-serve"].get("message")
        assert state == "RUNNING", apps
        image = next(tasks[0]["test"].rglob("*.png")).read_bytes()
        r = httpx.post(f"http://127.0.0.1:{serve_port}/classify", files={"file": ("x.png", image, "image/png")},
                       timeout=60)
        assert r.status_code == 200 and r.json()["model_version"] == 1, r.text
        assert r.json()["predictions"][0]["label"] in tasks[0]["classes"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.parametrize("overlay", NAMES)
def test_gcs_fault_tolerance_is_wired_as_the_operator_requires(rendered, overlay):
    """The RayService's GCS writes to the Redis this overlay deploys: the operator accepts the spec (its
    validation.go rules), the address it hands the head (RAY_REDIS_ADDRESS) names the rendered Service and port, the
    password it hands it (REDIS_PASSWORD) is the Secret key Redis itself requires, and only the RayService's head
    pods may reach Redis. The add-task RayJob's short-lived cluster runs without it (nothing to keep)."""
    from tests.kube_manifests import kuberay_gcs_ft_errors, kuberay_head_redis_settings

    objects = rendered[overlay]
    svc, job = _one(objects, "RayService"), _one(objects, "RayJob")
    cluster = svc["spec"]["rayClusterConfig"]
    assert kuberay_gcs_ft_errors(cluster, svc["metadata"].get("annotations", {})) == []
    assert "gcsFaultToleranceOptions" not in job["spec"]["rayClusterSpec"]
    given = kuberay_head_redis_settings(cluster)
    address = given["env"]["RAY_REDIS_ADDRESS"]
    assert address.startswith("redis://")
    host, port = address.removeprefix("redis://").split(":")
    service = _one(objects, "Service", host)
    assert int(port) == service["spec"]["ports"][0]["port"]
    redis = _one(objects, "StatefulSet", "cl-serve-redis")
    pod = redis["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    container = pod["spec"]["containers"][0]
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in container["ports"]}
    required = next(e for e in container["env"] if e["name"] == "REDIS_PASSWORD")["valueFrom"]
    assert given["env"]["REDIS_PASSWORD"] == required  # the same Secret and key on both sides
    assert "--requirepass" in container["args"] and "--appendonly" in container["args"]
    assert redis["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    policy = _one(objects, "NetworkPolicy", "cl-serve-redis")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    allowed = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert [r["ports"] for r in policy["spec"]["ingress"]] == [[{"protocol": "TCP", "port": 6379}]]
    for where, template in [*_pod_templates(svc), *_pod_templates(job)]:
        labels = template["metadata"]["labels"]
        assert (allowed.items() <= labels.items()) == (where == "cl-serve/head"), where


def test_the_operator_model_refuses_what_kuberay_refuses(rendered):
    """The checks above are not vacuous: each GCS FT mistake KubeRay's validation refuses is refused here too."""
    from tests.kube_manifests import kuberay_gcs_ft_errors

    good = _one(rendered["cpu-volume"], "RayService")["spec"]["rayClusterConfig"]
    mistakes = {
        "REDIS_PASSWORD env": lambda c: c["headGroupSpec"]["template"]["spec"]["containers"][0].setdefault(
            "env", []).append({"name": "REDIS_PASSWORD", "value": "x"}),
        "redis-password": lambda c: c["headGroupSpec"]["rayStartParams"].update({"redis-password": "x"}),
        "RAY_REDIS_ADDRESS env": lambda c: c["headGroupSpec"]["template"]["spec"]["containers"][0].setdefault(
            "env", []).append({"name": "RAY_REDIS_ADDRESS", "value": "redis://x:6379"}),
    }
    for name, mutate in mistakes.items():
        cluster = copy.deepcopy(good)
        mutate(cluster)
        assert kuberay_gcs_ft_errors(cluster, {}), name
    assert kuberay_gcs_ft_errors(good, {"ray.io/ft-enabled": "true"})
    assert kuberay_gcs_ft_errors(good, {"ray.io/external-storage-namespace": "x"})


@pytest.mark.parametrize("overlay", NAMES)
def test_every_pod_runs_as_its_own_service_account_and_only_the_autoscaler_mounts_a_token(rendered, overlay):
    """No pod runs as `default`; each names a ServiceAccount the overlay creates (KubeRay does not create a head
    account the template names: common/rbac.go builds one only for the cluster's own name). Only the RayService head
    mounts a token: KubeRay's autoscaler sidecar scales the workers through the API, with the Role the operator binds
    to that account. Every container has requests and limits."""
    objects = rendered[overlay]
    accounts = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ServiceAccount"}
    templates = [(w, t) for o in objects for w, t in _pod_templates(o)]
    assert len(templates) == 6  # RayService head + workers, RayJob head + workers, bootstrap Job, Redis
    for where, template in templates:
        spec = template["spec"]
        name = spec.get("serviceAccountName")
        assert name in accounts and name != "default", where
        mounts = spec.get("automountServiceAccountToken", accounts[name].get("automountServiceAccountToken", True))
        assert mounts == (where == "cl-serve/head"), where
        for c in spec["containers"]:
            assert c["resources"]["requests"] and c["resources"]["limits"], (where, c["name"])
    assert _one(objects, "RayService")["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


@pytest.mark.parametrize("overlay", NAMES)
def test_the_disruption_budget_covers_the_serving_workers_only(rendered, overlay):
    objects = rendered[overlay]
    pdb = _one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    selector = pdb["spec"]["selector"]["matchLabels"]
    covered = [w for o in objects for w, t in _pod_templates(o) if selector.items() <= t["metadata"]["labels"].items()]
    assert covered == ["cl-serve/cpu-workers"]
    workers = _one(objects, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert workers["minReplicas"] >= 2  # with one worker, the budget could not keep a replica up through a drain
