"""Render the deploy overlays with kustomize (kubectl's built-in one) and validate every rendered object offline:
Kubernetes kinds against kubernetes-validate's strict schemas, RayService and RayJob against
deploy/schemas/kuberay-v1.yaml joined with the same Kubernetes definitions (so their pod templates are checked as
strictly as a Deployment's), a RayService's serveConfigV2 against Ray Serve's own config schema, and every
cl-serve command line in a Job or RayJob against cl-serve's argument parser.

`python -m tests.kube_manifests [OVERLAY...]` prints one line per object (used by `make deploy-check`)."""
from __future__ import annotations

import functools
import json
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


@functools.lru_cache(maxsize=None)
def _kuberay_validator(k8s_version: str, kind: str):
    import jsonschema
    from kubernetes_validate.utils import schema_contents
    from referencing import Registry, Resource

    major_minor = ".".join(k8s_version.split(".")[:2])
    definitions = schema_contents(f"kubernetes-json-schema/v{major_minor}.0-local-strict/_definitions.json",
                                  k8s_version)
    schema = yaml.safe_load((DEPLOY / "schemas" / "kuberay-v1.yaml").read_text())
    registry = Registry().with_resources([(definitions["$id"], Resource.from_contents(definitions)),
                                          (schema["$id"], Resource.from_contents(schema))])
    if kind not in schema["$defs"]:
        raise ValueError(f"no schema for ray.io/v1 {kind} (deploy/schemas/kuberay-v1.yaml knows RayService, RayJob)")
    return jsonschema.Draft202012Validator({"$ref": f"{schema['$id']}#/$defs/{kind}"}, registry=registry)


def validate_kuberay(obj: dict, k8s_version: str) -> None:
    """Raise jsonschema.ValidationError (the most specific error) if a RayService/RayJob does not fit the schema."""
    import jsonschema

    errors = list(_kuberay_validator(k8s_version, obj["kind"]).iter_errors(obj))
    if errors:
        best = jsonschema.exceptions.best_match(errors)
        raise best


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


def validate_object(obj: dict, k8s_version: str) -> str:
    """Validate one rendered object; returns what it was checked against."""
    import kubernetes_validate

    if obj.get("apiVersion", "").startswith("ray.io/"):
        validate_kuberay(obj, k8s_version)
        if obj["kind"] == "RayService":
            validate_serve_config(obj["spec"]["serveConfigV2"])
            return "kuberay-v1 schema + Ray Serve config schema"
        return "kuberay-v1 schema"
    kubernetes_validate.validate(obj, k8s_version, strict=True)
    return "kubernetes strict schema"


def main(argv: list[str]) -> int:
    reason = kustomize_missing()
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
