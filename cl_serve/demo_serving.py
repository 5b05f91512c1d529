"""The demo's serving step: serve the live version with Ray Serve, classify a few test images over HTTP."""
from __future__ import annotations

import time
from pathlib import Path


def serve_and_classify(store: Path, test_dirs: list[Path]) -> dict:
    from cl_serve import serve_cli
    from cl_serve.client import classify_files

    port = serve_cli.free_port()
    url = f"http://127.0.0.1:{port}"
    print(f"[demo] starting Ray Serve on {url} ...")
    t0 = time.time()
    serve_cli.start(str(store), port=port, num_cpus=2)
    try:
        serve_cli.wait_until_healthy(url)
        images = [str(next(iter(sorted(c.iterdir())))) for d in test_dirs for c in sorted(d.iterdir())[:1]]
        answer = classify_files(images, url, top_k=1)
        print(f"[demo] server up in {time.time() - t0:.0f}s; POST /classify answered with version "
              f"{answer['model_version']}:")
        for path, p in zip(images, answer["predictions"]):
            print(f"    {Path(path).parent.name:>18s}/{Path(path).name} -> {p['label']} ({p['score']:.2f})")
        return {"url": url, "model_version": answer["model_version"], "predictions": answer["predictions"]}
    finally:
        serve_cli.stop()
