"""What one-image HTTP requests cost beside the model, measured with a compiled load generator (Debian's `wrk`):
`POST /classify` (JSON, base64) and `POST /v2/models/classifier/infer` (Triton's binary extension, what
tritonclient sends) against raw ONNX Runtime on the same version, in one run.

    python -m benchmarks.http_wrk --store STORE --name http-wrk-vits4-cpu

One replica on a local Ray Serve (2 CPUs), the store's live version; wrk runs on the same cores (as a client on the
machine would), one thread, `--seconds` per point at concurrency 1 and 32 (and whatever `--concurrency` lists);
raw ONNX Runtime: images/s at batch 32 over `--batches` batches and the p50/p99 of `--singles` batch-1 runs.
Each point starts on an idle model (one request answered first: a batch that was running when the last point's
wrk left is not charged to the next). `--floor` adds a bare Serve app on the same instance that reads the body and
answers a constant (what any request costs through Serve's proxy and a replica); `--direct` measures every route a
second time straight from the replica (`serve --direct-port`). Prints and saves benchmarks/results/NAME.{json,md}: req/s, p50 and p99
latency, non-2xx answers, wrk's socket errors (timeouts at 60 s included), req/s over raw batch-32 images/s, and
the CPU milliseconds per request of each process (Serve's proxy, the replicas, wrk, the rest of Ray) from /proc.
"""
from __future__ import annotations

import argparse
import base64
import json
import re
import resource
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from starlette.requests import Request  # at module level: the floor's route annotation is resolved here

from benchmarks.model_speed import model_speed
from benchmarks.results_io import command_line, save
from benchmarks.serving import cpu_seconds_by_component

HERE = Path(__file__).parent


def _image(store) -> bytes:
    import io

    from PIL import Image

    size = store.manifest(store.current()).preprocessing.scale_size
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def raw_onnx(store, batches: int, singles: int, precision: str = "fp32") -> dict:
    from cl_serve.serving.model import load_version

    model = load_version(store, store.current(), precision=precision)
    b32, lat = model_speed(model.run, model.preprocessing.input_size, batches, singles)
    return {"onnx_file": model.onnx_file, "images_per_s_b32": round(b32, 1),
            "b1_ms_p50": round(float(np.percentile(lat, 50)), 2), "b1_ms_p99": round(float(np.percentile(lat, 99)), 2)}


def _lua(body: bytes, headers: dict[str, str], work: Path) -> Path:
    (work / "body.bin").write_bytes(body)
    lines = ['wrk.method = "POST"', f'local f = io.open("{work / "body.bin"}", "rb")', "wrk.body = f:read('*a')",
             "f:close()"] + [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    script = work / f"post-{len(list(work.glob('*.lua')))}.lua"
    script.write_text("\n".join(lines) + "\n")
    return script


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([0-9.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(url: str, script: Path, concurrency: int, seconds: int) -> dict:
    # wrk leaves a response slower than its --timeout (2 s by default) out of the latency figures: at 224 px and
    # concurrency 32 every response is (32 images queued at ~15/s), so allow a minute.
    run = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "60s", "--latency", "-s",
                          str(script), url], capture_output=True, text=True, timeout=seconds + 120)
    out = run.stdout
    pct = dict(re.findall(r"^\s+(50|99)(?:\.000)?%\s+(\S+)[ \t]*$", out, re.M))
    if "Requests/sec" not in out or set(pct) != {"50", "99"}:
        raise RuntimeError(f"wrk gave no figures for {url}: {out[-500:]} {run.stderr[-500:]}")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"concurrency": concurrency, "req_per_s": float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1)),
            "requests": int(re.search(r"(\d+) requests in", out).group(1)),
            "p50_ms": round(_ms(pct["50"]), 1), "p99_ms": round(_ms(pct["99"]), 1),
            "non_2xx": int(bad.group(1)) if bad else 0,
            "socket_errors": sum(int(x) for x in errors.groups()) if errors else 0}


def drain(url: str, body: bytes, headers: dict[str, str]) -> None:
    """One request through the route, answered once the model is free: wrk leaves when its seconds are up, but a
    batch already running when it does (up to 32 images: 1.6 s for ViT-S/16 at 224 px here) cannot be recalled, and
    the next point must not pay for it. (Requests still waiting are cancelled by Serve when wrk disconnects.)"""
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=120).read()


def measured_cpu(run) -> dict:
    """`run()`'s wrk row with `cpu_ms_per_request`: CPU milliseconds (user + system) per answered request of each
    process kind over the run — Serve's proxy, the replicas (the classifier's and the floor's), controller, raylet,
    GCS, and wrk itself — read from /proc and from this process's children."""
    before, children = cpu_seconds_by_component(), resource.getrusage(resource.RUSAGE_CHILDREN)
    row = run()
    after, children_after = cpu_seconds_by_component(), resource.getrusage(resource.RUSAGE_CHILDREN)
    used = {k: after[k] - before.get(k, 0.0) for k in after if k != "client"}
    used["wrk"] = (children_after.ru_utime + children_after.ru_stime) - (children.ru_utime + children.ru_stime)
    row["cpu_ms_per_request"] = {k: round(1000 * v / max(row["requests"], 1), 2) for k, v in used.items()}
    return row


def routes(image: bytes) -> dict[str, tuple[str, bytes, dict[str, str]]]:
    header = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(image) + 4}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return {"/classify (JSON)": ("/classify", json.dumps({"images": [base64.b64encode(image).decode()]}).encode(),
                                 {"Content-Type": "application/json"}),
            "/v2 infer (binary)": ("/v2/models/classifier/infer",
                                   header + len(image).to_bytes(4, "little") + image,
                                   {"Inference-Header-Content-Length": str(len(header)),
                                    "Content-Type": "application/octet-stream"})}


def deploy_floor() -> str:
    """A bare Serve app on the same Serve instance that reads the body and answers a constant: the floor of a
    request's cost through Serve's proxy and a replica, whatever the model. Returns its path."""
    from fastapi import FastAPI
    from ray import serve

    floor = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=4096)
    @serve.ingress(floor)
    class Constant:
        async def constant(self, request):
            await request.body()
            return {"model_version": 0, "predictions": []}

        # The class itself, not the string this module's annotations would be: the replica unpickles this function
        # without this module's globals, and FastAPI takes an unresolved `request` for a query parameter (422).
        constant.__annotations__ = {"request": Request}
        constant = floor.post("/")(constant)

    serve.run(Constant.bind(), name="floor", route_prefix="/floor", blocking=False)
    return "/floor/"  # the app's own route: "/floor" would answer a redirect


def measure(store_root: str, concurrency: list[int], seconds: int, batches: int, singles: int,
            precision: str = "fp32", floor: bool = False, batch_wait_ms: float = 0.0, direct: bool = False,
            intra_op_threads: int | None = None, only_direct: bool = False, ort_spinning: bool = True) -> dict:
    from cl_serve.serving import launch
    from cl_serve.store.open_store import open_store

    store = open_store(store_root)
    raw = raw_onnx(store, batches, singles, precision)
    image = _image(store)
    port, direct_port = launch.free_ports(2)
    # direct: ports for two ingress replicas, the classifier's (first deployed: direct_port) and the floor's (+1)
    launch.start(store_root, port=port, num_cpus=2, quiet=True, precision=precision, batch_wait_ms=batch_wait_ms,
                 intra_op_threads=intra_op_threads, ort_spinning=ort_spinning,
                 direct_port=direct_port if direct else None, direct_slots=2)
    if direct:
        launch.wait_until_healthy(f"http://127.0.0.1:{direct_port}")
    rows = []
    try:
        with tempfile.TemporaryDirectory() as d:
            paths = routes(image)
            if floor:
                paths["Serve floor (constant)"] = (deploy_floor(), *paths["/classify (JSON)"][1:])
            targets = [] if only_direct else [(name, port, route) for name, route in paths.items()]
            if direct:  # the same routes straight from the replicas
                targets += [(f"{name}, direct", direct_port + name.startswith("Serve floor"), route)
                            for name, route in paths.items()]
            for name, at, (path, body, headers) in targets:
                script = _lua(body, headers, Path(d))
                wrk(f"http://127.0.0.1:{at}{path}", script, 4, 3)  # warm-up
                for c in concurrency:
                    url = f"http://127.0.0.1:{at}{path}"
                    drain(url, body, headers)
                    row = {"route": name, **measured_cpu(lambda: wrk(url, script, c, seconds))}
                    row["of_raw_b32"] = round(row["req_per_s"] / raw["images_per_s_b32"], 2)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    finally:
        launch.stop()
    return {"precision": precision, "batch_wait_ms": batch_wait_ms, "direct_ingress": direct,
            "intra_op_threads": intra_op_threads, "ort_spinning": ort_spinning,
            "onnx_file": raw["onnx_file"], "raw_onnx": raw, "rows": rows}


def _cpu(row: dict) -> str:
    c = row.get("cpu_ms_per_request")
    if not c:
        return "-"
    rest = sum(v for k, v in c.items() if k not in ("proxy", "replica", "wrk"))
    return f"{c['proxy']:.2f} / {c['replica']:.2f} / {c['wrk']:.2f} / {rest:.2f}"


def _markdown(r: dict) -> str:
    raw = r["raw_onnx"]
    lines = [f"# {r['name']}", "", f"`{r['command']}`", "",
             f"Served file: {r['onnx_file']} ({r['precision']}), batch wait {r['batch_wait_ms']} ms, ONNX Runtime "
             f"intra-op threads {r.get('intra_op_threads') or 'default'}, spinning "
             f"{'on' if r.get('ort_spinning', True) else 'off'}. "
             f"Raw ONNX Runtime: {raw['images_per_s_b32']} images/s at batch 32; batch 1 p50 {raw['b1_ms_p50']} ms, "
             f"p99 {raw['b1_ms_p99']} ms.", "",
             "| route | concurrency | req/s | of raw b32 | p50 ms | p99 ms | non-2xx | socket errors | CPU ms per "
             "request: proxy / replicas / wrk / rest |", "|---" * 9 + "|"]
    lines += [f"| {x['route']} | {x['concurrency']} | {x['req_per_s']} | {x['of_raw_b32']} | {x['p50_ms']} | "
              f"{x['p99_ms']} | {x['non_2xx']} | {x.get('socket_errors', '-')} | {_cpu(x)} |" for x in r["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--singles", type=int, default=100)
    ap.add_argument("--precision", choices=("fp32", "int8"), default="fp32", help="as `serve --precision`")
    ap.add_argument("--batch-wait-ms", type=float, default=0.0, help="as `serve --batch-wait-ms` (default 0)")
    ap.add_argument("--floor", action="store_true", help="also a bare Serve app answering a constant (same cores)")
    ap.add_argument("--direct", action="store_true", help="also every route straight from the replica "
                    "(`serve --direct-port`: Ray Serve's direct ingress, no proxy hop), in the same run")
    ap.add_argument("--only-direct", action="store_true", help="with --direct: skip the routes through the proxy")
    ap.add_argument("--intra-op-threads", type=int, default=None, help="ONNX Runtime's intra-op threads per replica "
                    "(default: its own choice, one per core)")
    ap.add_argument("--ort-spinning", action=argparse.BooleanOptionalAction, default=True,
                    help="as `serve --ort-spinning` (raw ONNX Runtime always runs with its defaults)")
    ap.add_argument("--name", default="http-wrk-cpu")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args(argv)
    result = {"name": a.name, "command": command_line("benchmarks.http_wrk", argv),
              **measure(a.store, a.concurrency, a.seconds, a.batches, a.singles, a.precision, a.floor,
                       a.batch_wait_ms, a.direct or a.only_direct, a.intra_op_threads, a.only_direct, a.ort_spinning)}
    save(a.out, a.name, result, _markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
