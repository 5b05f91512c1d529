"""`cl-serve serve` and `cl-serve classify`: run the HTTP server, and talk to one."""
from __future__ import annotations

import argparse

from cl_serve.commands.common import Command, print_json, store_arg
from cl_serve.serving.settings import default


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the live version over HTTP with Ray Serve; hot-swaps new versions")
    store_arg(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--direct-port", type=int, default=None, metavar="PORT", help=(
        "also answer on PORT (PORT+1, ... for more replicas) straight from the replica: Ray Serve's direct "
        "ingress, no proxy hop (--port keeps working)"))
    p.add_argument("--max-batch-size", type=int, default=32, help="images per model call (a request with more "
                   "runs alone)")
    p.add_argument("--batch-wait-ms", type=float, default=0.0, help=(
        "how long an idle model waits for more requests before it runs a lone one (default 0: at once; under load "
        "a batch is whatever arrived while the last one ran)"))
    p.add_argument("--poll-interval", type=float, default=default("poll_interval_s"), help="seconds between checks of the store's CURRENT")
    p.add_argument("--max-request-mb", type=float, default=default("max_request_bytes") / 2**20)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray instance")
    p.add_argument("--gpus-per-replica", type=float, default=0.0,
                   help="GPUs each replica requests (fractions share a GPU); on CUDA the fp16 ONNX file is preferred")
    p.add_argument("--max-queued-requests", type=int, default=default("max_queued_requests"),
                   help="requests one replica holds at once; beyond, 503 with Retry-After")
    p.add_argument("--request-timeout", type=float, default=default("request_timeout_s"), help="seconds per request before a 503")
    p.add_argument("--canary", type=float, default=0.0, metavar="P", help="send P%% of requests (those without "
                   "?version) to the newest candidate the release gate refused; responses say canary: true")
    p.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                   help="int8: serve each version's int8 file (cl-serve export --int8) where it has one, fp32 "
                        "with a warning where it has none")
    p.add_argument("--intra-op-threads", type=int, default=None, metavar="N", help=(
        "ONNX Runtime's threads per model call (default: one per core the replica sees)"))
    p.add_argument("--ort-spinning", action=argparse.BooleanOptionalAction, default=True, help=(
        "let ONNX Runtime's idle threads busy-wait for work (its default; --no-ort-spinning gives that CPU to "
        "request handling on shared cores)"))
    p.add_argument("--model-name", default=default("model_name"), metavar="NAME",
                   help="the model's name in the Open Inference Protocol routes (/v2/models/NAME/infer)")
    p.add_argument("--metrics-port", type=int, default=8080, help="Ray's Prometheus endpoint on 127.0.0.1")
    p.add_argument("--auth-token", default=None, metavar="TOKEN",
                   help="require `Authorization: Bearer TOKEN` on every route but the probes and the page "
                        "(default: $CL_SERVE_AUTH_TOKEN; unset = no token). Prefer the variable: argv is visible to ps")


def _serve(a: argparse.Namespace) -> int:
    from cl_serve.serving.launch import serve_forever

    serve_forever(a)
    return 0


def _classify_parser(sub) -> None:
    p = sub.add_parser("classify", help="send images to a running server and print its predictions")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--top-k", type=int, default=3)


def _classify(a: argparse.Namespace) -> int:
    from cl_serve.serving.client import classify_files

    print_json(classify_files(a.images, a.url, a.top_k))
    return 0


COMMANDS = [Command("serve", _serve_parser, _serve), Command("classify", _classify_parser, _classify)]
