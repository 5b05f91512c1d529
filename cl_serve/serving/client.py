"""`cl-serve classify`: send image files to a running server (stdlib HTTP, JSON + base64)."""
from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from pathlib import Path

from cl_serve.base.errors import UserError


def classify_files(paths: list[str], url: str, top_k: int = 3, timeout: float = 60.0) -> dict:
    images = []
    for p in paths:
        try:
            images.append(base64.b64encode(Path(p).read_bytes()).decode())
        except OSError as e:
            raise UserError(f"cannot read {p}: {e.strerror}") from None
    req = urllib.request.Request(url.rstrip("/") + "/classify", method="POST",
                                 data=json.dumps({"images": images, "top_k": top_k}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")
        try:
            body = json.loads(body).get("error", body)
        except ValueError:
            pass
        raise UserError(f"server answered {e.code}: {body}") from None
    except urllib.error.URLError as e:
        raise UserError(f"cannot reach {url}: {e.reason}") from None
