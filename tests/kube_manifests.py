"""Render the deploy overlays with kustomize (kubectl's built-in one) and validate every rendered object offline:
Kubernetes kinds against kubernetes-validate's strict schemas, RayService and RayJob against KubeRay's own upstream
CRDs (v1.4.2 and v1.7.0, read from ../shared/kuberay or $CL_SERVE_KUBERAY_CRDS; a field the API server would prune
is an error), names and label values as the API server checks them, a RayService's serveConfigV2 against Ray Serve's own config schema, and every
cl-serve command line in a Job or RayJob against cl-serve's argument parser.

`python -m tests.kube_manifests [OVERLAY...]` prints one line per object (used by `make deploy-check`)."""
from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = sorted(p.parent for p in (DEPLOY / "overlays").glob("*/kustomization.yaml"))
K8S_VERSIONS = ("1.30.0", "1.37.0")  # the oldest and newest Kubernetes releases the manifests are checked against


def kustomize_missing() -> str | None:
    """Why the overlays cannot be rendered here, or None. Components need kustomize >= v4 (kubectl >= 1.21)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return "kubectl (with its built-in kustomize) is not installed"
    out = subprocess.run([kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=60)
    try:
        version = json.loads(out.stdout).get("kustomizeVersion", "")
    except ValueError:
        version = ""
    match = re.match(r"v(\d+)", version)
    if not match or int(match.group(1)) < 4:
        return f"kubectl's kustomize is {version or 'unknown'}; components need v4 or newer"
    return None


def render(overlay: Path) -> list[dict]:
    """The objects `kubectl apply -k OVERLAY` would send."""
    out = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"kustomize failed on {overlay}: {out.stderr.strip()}")
    return [obj for obj in yaml.safe_load_all(out.stdout) if obj]


# KubeRay's own CRDs (unmodified upstream files) for the operator versions the manifests are checked against.
KUBERAY_VERSIONS = ("v1.4.2", "v1.7.0")
KUBERAY_CRDS = Path(os.environ.get("CL_SERVE_KUBERAY_CRDS", ROOT.parent / "shared" / "kuberay"))
_PLURAL = {"RayService": "rayservices", "RayJob": "rayjobs", "RayCluster": "rayclusters"}


def crds_missing() -> str | None:
    """Why the upstream CRDs cannot be read here, or None ($CL_SERVE_KUBERAY_CRDS/<version>/ray.io_*.yaml)."""
    for v in KUBERAY_VERSIONS:
        for plural in _PLURAL.values():
            if not (KUBERAY_CRDS / v / f"ray.io_{plural}.yaml").is_file():
                return f"{KUBERAY_CRDS / v / f'ray.io_{plural}.yaml'} is missing (set CL_SERVE_KUBERAY_CRDS)"
    return None


def structural_to_json_schema(node):
    """A CRD's openAPIV3Schema as a JSON Schema that refuses what the API server would prune or reject.

    An object schema with `properties` and neither `additionalProperties` nor `x-kubernetes-preserve-unknown-fields`
    drops unknown fields silently on the server (pruning): here they fail with additionalProperties. int-or-string
    and nullable become their JSON Schema forms; CEL rules (x-kubernetes-validations) are not evaluated."""
    if isinstance(node, list):
        return [structural_to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: structural_to_json_schema(v) for k, v in node.items()
           if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out = {"anyOf": [{"type": "integer"}, {"type": "string"}], **{k: v for k, v in out.items() if k != "format"}}
    if "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@functools.lru_cache(maxsize=None)
def _kuberay_validator(kuberay_version: str, kind: str):
    import jsonschema

    if kind not in _PLURAL:
        raise ValueError(f"no upstream CRD for ray.io/v1 {kind}")
    crd = yaml.safe_load((KUBERAY_CRDS / kuberay_version / f"ray.io_{_PLURAL[kind]}.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = structural_to_json_schema(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: checked by check_names
    return jsonschema.Draft202012Validator(schema)


def validate_kuberay(obj: dict, kuberay_version: str = KUBERAY_VERSIONS[-1]) -> None:
    """Raise jsonschema.ValidationError (the most specific error) if a RayService/RayJob does not fit KubeRay's own
    CRD at `kuberay_version`, or has a field the API server would prune."""
    import jsonschema

    errors = list(_kuberay_validator(kuberay_version, obj["kind"]).iter_errors(obj))
    if errors:
        best = jsonschema.exceptions.best_match(errors)
        if best.validator == "additionalProperties":
            best.message = f"pruned by the API server (not in KubeRay {kuberay_version}'s CRD): {best.message}"
        raise best


_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def check_names(obj: dict) -> None:
    """What the API server checks beyond the schema: object names, storage class names and label values."""
    problems = []

    def name(value, where):
        if not isinstance(value, str) or len(value) > 253 or not _DNS1123_SUBDOMAIN.match(value):
            problems.append(f"{where} {value!r} is not a valid name (DNS-1123: lower case, digits, '-', '.')")

    def labels(mapping, where):
        for k, v in (mapping or {}).items():
            if not isinstance(v, str) or len(v) > 63 or not _LABEL_VALUE.match(v):
                problems.append(f"{where} label {k}={v!r} is not a valid label value")

    name(obj.get("metadata", {}).get("name"), "metadata.name")
    labels(obj.get("metadata", {}).get("labels"), "metadata")

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "storageClassName" and v != "":
                    name(v, f"{path}.{k}")
                elif k == "metadata" and isinstance(v, dict):
                    labels(v.get("labels"), f"{path}.metadata")
                walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(obj.get("spec", {}), "spec")
    if problems:
        raise ValueError(f"{obj['kind']}/{obj.get('metadata', {}).get('name')}: " + "; ".join(problems))


def validate_serve_config(text: str) -> dict:
    """serveConfigV2 as Ray Serve parses it (raises pydantic's ValidationError); returns the parsed YAML."""
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(text)
    ServeDeploySchema.model_validate(config)
    return config


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) and the shell's $VAR / ${VAR:?msg} expansion, enough for our command lines."""
    text = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], text)
    text = re.sub(r"\$\{(\w+)(:\?[^}]*)?\}", lambda m: env[m.group(1)], text)
    return re.sub(r"\$(\w+)", lambda m: env[m.group(1)], text)


def cl_serve_command_lines(objects: list[dict], env: dict[str, str]) -> list[list[str]]:
    """argv of every cl-serve invocation: Job containers' commands and RayJob entrypoints, variables expanded."""
    lines = []
    for obj in objects:
        if obj["kind"] == "Job":
            for c in obj["spec"]["template"]["spec"]["containers"]:
                argv = [_expand(a, env) for a in c.get("command", []) + c.get("args", [])]
                if argv[:1] == ["cl-serve"]:
                    lines.append(argv)
        elif obj["kind"] == "RayJob":
            lines.append(shlex.split(_expand(obj["spec"]["entrypoint"], env)))
    return lines


def check_cli(argv: list[str]) -> None:
    """Parse a cl-serve command line with cl-serve's own parser (SystemExit on an unknown or malformed option)."""
    from cl_serve.cli import build_parser

    assert argv[0] == "cl-serve", argv
    build_parser().parse_args(argv[1:])


# ray-operator/controllers/ray/utils/validation.go (ValidateRayJobSpec): a submissionMode the CRD's schema lets through
# but the operator refuses when it reconciles the RayJob.
RAYJOB_SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")


def operator_checks(obj: dict) -> None:
    """What the operator refuses at reconcile time although the API server admitted the object."""
    if obj["kind"] == "RayJob":
        mode = obj["spec"].get("submissionMode", "K8sJobMode")
        if mode not in RAYJOB_SUBMISSION_MODES:
            raise ValueError(f"RayJob submissionMode {mode!r}: the operator accepts {', '.join(RAYJOB_SUBMISSION_MODES)}")


def validate_object(obj: dict, k8s_version: str) -> str:
    """Validate one rendered object; returns what it was checked against. Ray objects are checked against every
    KubeRay CRD version in KUBERAY_VERSIONS (they do not depend on the Kubernetes version)."""
    import kubernetes_validate

    check_names(obj)
    if obj.get("apiVersion", "").startswith("ray.io/"):
        for version in KUBERAY_VERSIONS:
            validate_kuberay(obj, version)
        operator_checks(obj)
        what = f"KubeRay {'/'.join(KUBERAY_VERSIONS)} CRDs, no pruned field"
        if obj["kind"] == "RayService":
            validate_serve_config(obj["spec"]["serveConfigV2"])
            return what + " + Ray Serve config schema"
        return what
    kubernetes_validate.validate(obj, k8s_version, strict=True)
    return "kubernetes strict schema"


def main(argv: list[str]) -> int:
    reason = kustomize_missing() or crds_missing()
    if reason:
        print(f"cannot render: {reason}", file=sys.stderr)
        return 2
    for overlay in [Path(a) for a in argv] or OVERLAYS:
        objects = render(overlay)
        for version in K8S_VERSIONS:
            for obj in objects:
                what = validate_object(obj, version)
                print(f"{overlay.name}: {obj['kind']}/{obj['metadata']['name']} ok on Kubernetes {version} ({what})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


# --- What the KubeRay operator does with GCS fault tolerance, written from its code --------------------------------
# controllers/ray/utils/validation.go (ValidateRayClusterSpec) refuses these; common/pod.go (configureGCSFaultTolerance,
# configureRedisFT) then sets them itself on the head pod from `gcsFaultToleranceOptions`.
FT_ANNOTATION, FT_NAMESPACE_ANNOTATION = "ray.io/ft-enabled", "ray.io/external-storage-namespace"


def kuberay_gcs_ft_errors(cluster: dict, annotations: dict) -> list[str]:
    """The operator's refusals of a RayCluster spec (a RayService's rayClusterConfig) about GCS fault tolerance."""
    errors = []
    options = cluster.get("gcsFaultToleranceOptions")
    head = cluster["headGroupSpec"]
    env = {e["name"] for e in head["template"]["spec"]["containers"][0].get("env", [])}
    params = head.get("rayStartParams", {})
    if annotations.get(FT_ANNOTATION) and options is not None:
        errors.append("ray.io/ft-enabled annotation and gcsFaultToleranceOptions are both set")
    enabled = options is not None or annotations.get(FT_ANNOTATION, "").lower() == "true"
    if not enabled and "RAY_REDIS_ADDRESS" in env:
        errors.append("RAY_REDIS_ADDRESS implicitly enables GCS FT without gcsFaultToleranceOptions")
    if options is not None:
        if params.get("redis-password"):
            errors.append("redis-password in rayStartParams with gcsFaultToleranceOptions")
        if "REDIS_PASSWORD" in env:
            errors.append("REDIS_PASSWORD env in the head with gcsFaultToleranceOptions")
        if "RAY_REDIS_ADDRESS" in env:
            errors.append("RAY_REDIS_ADDRESS env in the head with gcsFaultToleranceOptions")
        if annotations.get(FT_NAMESPACE_ANNOTATION):
            errors.append("ray.io/external-storage-namespace annotation with gcsFaultToleranceOptions")
    if params.get("redis-username") or "REDIS_USERNAME" in env:
        errors.append("redis username outside gcsFaultToleranceOptions")
    return errors


def kuberay_head_redis_settings(cluster: dict) -> dict:
    """What configureRedisFT gives the head container: env name -> value or valueFrom, and the rayStartParams."""
    options = cluster["gcsFaultToleranceOptions"]
    env = {"RAY_REDIS_ADDRESS": options["redisAddress"]}
    params = {}
    if "redisPassword" in options:
        params["redis-password"] = "$REDIS_PASSWORD"
        env["REDIS_PASSWORD"] = options["redisPassword"].get("value") or options["redisPassword"]["valueFrom"]
    return {"env": env, "rayStartParams": params}
