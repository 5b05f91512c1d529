"""Hostile-input probe of a live server: what one request can cost, in time and replica memory.

    python -m benchmarks.hostile --name hostile-cpu       # ~1 min on 2 cores; JSON under benchmarks/results/

Starts a local `cl-serve serve` on a tiny generated store, then sends (1) the hostile requests of
`hostile_cases` (image bombs, extreme aspect ratios, malformed JSON and multipart, oversized bodies, bad
top_k), (2) the most expensive requests the limits still admit (the largest PNG, WebP and CMYK JPEG, the
per-request pixel budget filled, 64 ordinary images), (3) the generated corpus of `benchmarks.hostile_corpus`
(575 cases in 7 families) and (4) slowloris of 64 and 500 connections. For each: status, wall time, and the growth of the replica's peak RSS (VmHWM, reset
before every request through /proc/PID/clear_refs where allowed). Prints a table and the worst time and memory,
and the replica's resident size when idle before the run and after it (memory given back, or kept).
The same `hostile_cases` are asserted (4xx, bounded time) in tests/test_server.py.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import tempfile
import time
from pathlib import Path

from benchmarks.image_builders import encoded_image, png_header_only

HERE = Path(__file__).parent


def hostile_cases(good: bytes) -> dict[str, dict]:
    """name -> httpx request kwargs: what an attacker or a careless client sends to POST /classify."""
    b64 = base64.b64encode(good).decode()

    def files(blob: bytes, n: int = 1) -> dict:
        return {"files": [("file", (f"{i}.png", blob, "image/png")) for i in range(n)]}

    def raw(body, ctype: str = "application/json") -> dict:
        return {"content": body, "headers": {"content-type": ctype}}

    return {
        "top_k 1e999": raw(b'{"images": ["%s"], "top_k": 1e999}' % b64.encode()),
        "top_k 1.5": {"json": {"images": [b64], "top_k": 1.5}},
        "top_k true": {"json": {"images": [b64], "top_k": True}},
        "top_k 0": {"json": {"images": [b64], "top_k": 0}},
        "top_k -3": {"json": {"images": [b64], "top_k": -3}},
        "top_k 10^30": {"json": {"images": [b64], "top_k": 10 ** 30}},
        "top_k query 1e999": {"json": {"images": [b64]}, "params": {"top_k": "1e999"}},
        "top_k query superscript two": {"json": {"images": [b64]}, "params": {"top_k": "\u00b2"}},
        "top_k form 1e999": {**files(good), "data": {"top_k": "1e999"}},
        "JSON nested 200000 deep": raw(b"[" * 200_000 + b"]" * 200_000),
        "JSON images nested 100000 deep": raw(b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        "JSON not an object": raw(b'"images"'),
        "JSON unknown key": {"json": {"images": [b64], "evil": 1}},
        "JSON images not strings": {"json": {"images": [1, 2]}},
        "JSON no images": {"json": {"images": []}},
        "65 images": {"json": {"images": [b64] * 65}},
        "PNG 4000000x1 (header only)": files(png_header_only(4_000_000, 1)),
        "PNG 500000x1": files(encoded_image("PNG", (500_000, 1))),
        "PNG 1x39000000 (header only)": files(png_header_only(1, 39_000_000)),
        "PNG 30000x30000 (header only)": files(png_header_only(30_000, 30_000)),
        "PNG 60000x60000 (header only)": files(png_header_only(60_000, 60_000)),
        "12 x PNG 500000x1": files(encoded_image("PNG", (500_000, 1)), 12),
        "GIF 20000x1": files(encoded_image("GIF", (20_000, 1))),
        "BMP 1x10000": files(encoded_image("BMP", (1, 10_000))),
        "truncated JPEG": files(encoded_image("JPEG", (640, 480), "RGB")[:300]),
        "PNG 0x0 (header only)": files(png_header_only(0, 0)),
        "PDF": files(b"%PDF-1.4\n%%EOF"),
        "chunked body of 6.5 MB": raw((b"x" * 65536 for _ in range(100))),
        "multipart without boundary": raw(b"--x\r\n", "multipart/form-data"),
        "multipart garbage": raw(b"--b\r\nContent-Disposition: form-data\r\n\r\n" + b"x" * 100,
                                 "multipart/form-data; boundary=b"),
        "no content type": {"content": b"abc"},
        # issue #18's cases, sized under the test server's 2 MB body limit so that parsing, not the limit, refuses
        "JSON array of 900000 integers": raw(b'{"images": [' + b",".join([b"1"] * 900_000) + b"]}"),
        "JPEG of 450000 empty APP1 segments": files(b"\xff\xd8" + b"\xff\xe1\x00\x02" * 450_000),
        "JPEG with 1.8 MB of fill bytes": files(b"\xff\xd8\xff\xe0\x00\x02" + b"\xff" * 1_800_000),
        "GIF with a comment of 900000 sub-blocks": files(b"GIF89a\x01\x00\x01\x00\x00\x00\x00\x21\xfe"
                                                         + b"\x01A" * 900_000 + b"\x00;"),
    }


def admitted_worst_cases() -> dict[str, dict]:
    """The most expensive requests the default limits admit (or just refuse): the per-request worst case."""
    from PIL import Image

    def files(blobs: list[bytes]) -> dict:
        return {"files": [("file", (f"{i}.png", b, "application/octet-stream")) for i, b in enumerate(blobs)]}

    big_png = encoded_image("PNG", (6300, 6300))  # 39.7 M pixels: under max_pixels (40 M)
    rgba_png = encoded_image("PNG", (6300, 6300), "RGBA")
    big_jpeg = encoded_image("JPEG", (6300, 6300), "RGB")
    budget = encoded_image("PNG", (5700, 5700))  # 32.5 M pixels: three fill the 100 M request budget
    ordinary = encoded_image("JPEG", (1024, 768), "RGB")
    def saved(mode: str, size: tuple[int, int], fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        Image.new(mode, size).save(buf, format=fmt, **kw)
        return buf.getvalue()

    return {
        # the cases: refused (413) since WebP and progressive/CMYK JPEG have their own pixel limit (12 M)
        "WebP 6300x6300 lossless (1.6 kB, 39.7 Mpx)": files([saved("RGB", (6300, 6300), "WEBP", lossless=True)]),
        "JPEG 6300x6300 CMYK progressive": files([saved("CMYK", (6300, 6300), "JPEG", progressive=True)]),
        # the largest such files admitted
        "WebP 4000x3000 RGB lossless (12 Mpx)": files([saved("RGB", (4000, 3000), "WEBP", lossless=True)]),
        "WebP 4000x3000 RGBA lossless (12 Mpx)": files([saved("RGBA", (4000, 3000), "WEBP", lossless=True)]),
        "JPEG 4000x3000 CMYK progressive (12 Mpx)": files([saved("CMYK", (4000, 3000), "JPEG", progressive=True)]),
        "JPEG 4000x3000 RGB progressive (12 Mpx)": files([saved("RGB", (4000, 3000), "JPEG", progressive=True)]),
        "PNG 6300x6300 grey (39.7 Mpx)": files([big_png]),
        "PNG 6300x6300 RGBA (39.7 Mpx)": files([rgba_png]),
        "JPEG 6300x6300 (DCT-reduced decode)": files([big_jpeg]),
        "3 x PNG 5700x5700 (97 Mpx, the budget)": files([budget] * 3),
        "4 x PNG 5700x5700 (over the budget)": files([budget] * 4),
        "64 x JPEG 1024x768": files([ordinary] * 64),
    }


def _replica_pids() -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"ServeReplica:cl-serve" in open(f"/proc/{pid}/cmdline", "rb").read():
                pids.append(int(pid))
        except OSError:
            continue
    return pids


def _peak_rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_corpus(client, pid: int, good: bytes) -> dict:
    """Every case of `benchmarks.hostile_corpus`: status (and whether the case allows it), time, peak RSS growth;
    summarised per family (cases, unexpected statuses, 5xx, worst time, worst memory)."""
    from benchmarks.hostile_corpus import corpus

    rows = []
    for case in corpus(good):
        kwargs = dict(case.kwargs)
        method = kwargs.pop("method", "POST")
        reset = _reset_peak(pid)
        base = _peak_rss_mib(pid) if reset else None
        t0 = time.monotonic()
        try:
            status = client.request(method, "/classify", **kwargs).status_code
        except Exception as e:  # a dropped connection is a failure too
            status = type(e).__name__
        took = time.monotonic() - t0
        growth = (_peak_rss_mib(pid) - base) if reset else None
        rows.append({"family": case.family, "case": case.name, "status": status, "expected": status in case.allowed,
                     "seconds": round(took, 3), "peak_rss_growth_mib": None if growth is None else round(growth, 1)})
    summary: dict[str, dict] = {}
    for r in rows:
        f = summary.setdefault(r["family"], {"cases": 0, "unexpected": 0, "5xx_or_failed": 0, "worst_seconds": 0.0,
                                             "worst_peak_rss_growth_mib": 0.0})
        f["cases"] += 1
        f["unexpected"] += not r["expected"]
        f["5xx_or_failed"] += not isinstance(r["status"], int) or r["status"] >= 500
        f["worst_seconds"] = max(f["worst_seconds"], r["seconds"])
        f["worst_peak_rss_growth_mib"] = max(f["worst_peak_rss_growth_mib"], r["peak_rss_growth_mib"] or 0.0)
    for r in rows:
        if not r["expected"]:
            print(f"corpus: unexpected {r['status']} for {r['family']} / {r['case']}", flush=True)
    for fam, f in summary.items():
        print(f"corpus {fam:10s} {f['cases']:4d} cases, {f['unexpected']} unexpected, {f['5xx_or_failed']} 5xx, "
              f"worst {f['worst_seconds']:.3f}s {f['worst_peak_rss_growth_mib']:+.1f} MiB", flush=True)
    return {"rows": rows, "summary": summary}


def slowloris(client, url: str, image: bytes, connections: int, probes: int = 8) -> dict:
    """`connections` sockets send the headers of POST /classify (Content-Length 1000) and one body byte, then
    stall; meanwhile `probes` legitimate classifies and /healthz calls are timed. Then the stalled sockets are read:
    each should have been answered 408 when the body deadline passed."""
    import socket

    host, port = url.split("//")[1].split(":")
    head = (f"POST /classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n{").encode()
    socks = []
    try:
        for _ in range(connections):
            s = socket.create_connection((host, int(port)), timeout=60)
            s.sendall(head)
            socks.append(s)
        time.sleep(0.5)
        statuses, times = [], []
        for _ in range(probes):
            t0 = time.monotonic()
            statuses.append(client.post("/classify", files=[("file", ("a.png", image, "image/png"))]).status_code)
            t1 = time.monotonic()
            statuses.append(client.get("/healthz").status_code)
            times += [t1 - t0, time.monotonic() - t1]
        answers: dict[str, int] = {}
        for s in socks:
            try:
                code = s.recv(64).split(b" ")[1].decode()
            except (OSError, IndexError):
                code = "no answer"
            answers[code] = answers.get(code, 0) + 1
    finally:
        for s in socks:
            s.close()
    out = {"connections": connections, "legitimate_statuses": sorted(set(statuses)),
           "legitimate_slowest_seconds": round(max(times), 3), "stalled_answers": answers}
    print(f"slowloris of {connections}: legitimate {out['legitimate_statuses']}, slowest "
          f"{out['legitimate_slowest_seconds']}s; stalled uploads answered {answers}", flush=True)
    return out


def start_tiny_server(work: Path) -> tuple[str, bytes]:
    """A store with one tiny version, served on a free port: (url, one good PNG)."""
    from cl_serve.serving import launch as serve_cli
    from cl_serve.trainer.synthetic import class_names, write_image_folder
    from cl_serve.trainer.train import TrainConfig
    from cl_serve.workflow import pipeline

    store = work / "store"
    pipeline.init_store(store, method={"name": "none"}, head={"name": "analytic", "projection": 256},
                        backbone="vit_tiny_patch16_224",
                        timm_kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2})
    data = write_image_folder(work / "task", class_names(3), 8, seed=0)
    pipeline.add_task(store, data, TrainConfig(epochs=1, batch_size=16, device="cpu"), progress=False)
    port = serve_cli.free_port()
    serve_cli.start(str(store), port=port, num_cpus=2)
    url = f"http://127.0.0.1:{port}"
    serve_cli.wait_until_healthy(url)
    return url, next(data.rglob("*.png")).read_bytes()


def run_cases(c, pid: int, good: bytes) -> list[dict]:
    """Every listed hostile case and admitted worst case, one at a time: status, seconds, the replica's peak growth."""
    import httpx

    rows = []
    for group, cases in (("hostile", hostile_cases(good)), ("admitted worst case", admitted_worst_cases())):
        for name, kwargs in cases.items():
            reset = _reset_peak(pid)
            base = _peak_rss_mib(pid) if reset else None
            t0 = time.monotonic()
            try:
                status = c.post("/classify", **kwargs).status_code
            except httpx.HTTPError as e:
                status = type(e).__name__
            took = time.monotonic() - t0
            growth = (_peak_rss_mib(pid) - base) if reset else None
            rows.append({"group": group, "case": name, "status": status, "seconds": round(took, 3),
                         "peak_rss_growth_mib": None if growth is None else round(growth, 1)})
            print(f"{group:20s} {name:42s} {status!s:>5} {took:7.3f}s "
                  f"{'' if growth is None else f'{growth:+8.1f} MiB'}", flush=True)
    return rows


def summarise(rows: list[dict], generated: dict, slow: list[dict], ok: int, pid: int, idle_rss: float,
              after_rss: float) -> dict:
    fivexx = [r for r in rows if not isinstance(r["status"], int) or r["status"] >= 500]
    worst_t = max(rows, key=lambda r: r["seconds"])
    worst_m = max((r for r in rows if r["peak_rss_growth_mib"] is not None),
                  key=lambda r: r["peak_rss_growth_mib"], default=None)
    return {"requests": len(rows), "5xx_or_failed": len(fivexx), "served_after": ok, "slowloris": slow,
            "corpus": generated["summary"],
            "replica_rss_idle_mib": round(idle_rss, 1), "replica_rss_after_run_mib": round(after_rss, 1),
            "replica_rss_kept_mib": round(after_rss - idle_rss, 1),
            "worst_seconds": worst_t, "worst_peak_rss_growth": worst_m, "replica_peak_rss_mib": _peak_rss_mib(pid)
            if os.path.exists(f"/proc/{pid}") else None, "cpu_count": os.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", default="hostile-cpu")
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args(argv)

    import httpx

    from cl_serve.serving import launch as serve_cli

    url, good = start_tiny_server(Path(tempfile.mkdtemp(prefix="cl-hostile-")))
    pid = _replica_pids()[0]
    try:
        with httpx.Client(base_url=url, timeout=120) as c:
            for _ in range(5):  # warm: the first requests load the model and the batcher
                c.post("/classify", files=[("file", ("a.png", good, "image/png"))])
            idle_rss = _rss_mib(pid)
            rows = run_cases(c, pid, good)
            ok = c.post("/classify", files=[("file", ("a.png", good, "image/png"))]).status_code
            generated = run_corpus(c, pid, good)
            slow = [slowloris(c, url, good, n) for n in (64, 500)]
            time.sleep(1.0)
            after_rss = _rss_mib(pid)
    finally:
        serve_cli.stop()
    summary = summarise(rows, generated, slow, ok, pid, idle_rss, after_rss)
    print(json.dumps(summary, indent=1))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"{a.name}.json").write_text(json.dumps({"summary": summary, "rows": rows,
                                                            "corpus_rows": generated["rows"]}, indent=1))
    slow_ok = all(r["legitimate_statuses"] == [200] for r in slow)
    corpus_ok = all(f["unexpected"] == 0 for f in generated["summary"].values())
    return 0 if not summary["5xx_or_failed"] and ok == 200 and slow_ok and corpus_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
