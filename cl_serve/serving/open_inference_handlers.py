"""What the Open Inference Protocol's REST routes do (KServe V2, as Triton, KServe, MLServer and Seldon speak it):
a mixin of `cl_serve.serving.app.Classifier`, which declares the routes (/v2, /v2/health/*, /v2/models/{name}
[/versions/{v}][/ready|/infer]) and calls these. Both protocols go through one model interface — `choose_model`
(live, a version, the canary), `decode`, `infer` — and one admission path (`answer`: body limits, queue bound,
deadline, metrics); the request and response formats are `cl_serve.serving.open_inference`'s job.

`{name}` is the `model_name` setting; versions are store versions (the live one when none is named).
"""
from __future__ import annotations

import asyncio
from typing import Any, Optional

from fastapi import Request
from fastapi.responses import Response

import cl_serve
from cl_serve.serving.api_models import error_responses
from cl_serve.serving.http_app import error
from cl_serve.serving.model import BadInput, LoadedModel
from cl_serve.serving.open_inference import (HEADER_LENGTH, encode_response, model_metadata, parse_infer,
                                             server_metadata)
from cl_serve.serving.request_parsing import parse_version

V2_INFER_ERRORS = error_responses(400, 401, 404, 408, 409, 413, 415, 422, 503)


class OpenInferenceHandlers:
    """The /v2 behaviour; expects the deployment's `settings`, `watcher`, `answer`, `choose_model`, `decode`,
    `infer`, `_model_of` and `_decode_slots`."""

    def _named(self, name: str) -> None:
        if name != self.settings["model_name"]:
            raise BadInput(404, f"unknown model {name[:60]!r}; this server serves {self.settings['model_name']!r}")

    async def _v2_model(self, name: str, version: Optional[str]) -> LoadedModel:
        self._named(name)
        if version is not None:
            return await self._model_of(parse_version(version))
        if self.watcher.model is None:
            raise BadInput(503, self.watcher.unavailable_reason() or "no model")
        return self.watcher.model

    def v2_server_metadata(self) -> dict[str, Any]:
        return server_metadata(cl_serve.__version__)

    def v2_server_ready(self):
        if self.watcher.model is None:
            return error(503, self.watcher.unavailable_reason() or "no model")
        return {"ready": True}

    async def v2_metadata(self, name: str, version: Optional[str]):
        try:
            model = await self._v2_model(name, version)
        except BadInput as e:
            return error(e.status, e.message)
        versions = await asyncio.to_thread(self.watcher.store.versions)
        return model_metadata(name, model.version, sorted(versions), len(model.labels),
                              model.preprocessing.model_dump())

    async def v2_model_ready_answer(self, name: str, version: Optional[str]):
        try:
            model = await self._v2_model(name, version)
        except BadInput as e:
            return error(e.status, e.message)
        return {"name": name, "version": str(model.version), "ready": True}

    async def v2_infer_answer(self, request: Request, body: bytes, name: str, version: Optional[str]):
        """One infer request, after admission: (response, the version that answered)."""
        self._named(name)  # a BadInput from here on is answered by the admission path (`answer`)
        model, canary = await self.choose_model(parse_version(version))
        if request.headers.get("content-encoding", "identity").strip().lower() != "identity":
            raise BadInput(415, "compressed request bodies are not accepted (send without Content-Encoding)")
        size = model.preprocessing.input_size
        async with self._decode_slots:  # a JSON tensor costs memory while it is parsed: bounded like decoding
            parsed = await asyncio.to_thread(parse_infer, body, request.headers.get(HEADER_LENGTH),
                                             input_size=size, max_images=int(self.settings["max_images"]))
        x = parsed.pixels if parsed.images is None else await self.decode(parsed.images, model)
        served, labels, logits = await self.infer(model, x)
        content, headers = encode_response(parsed, model_name=name, version=served, canary=canary, logits=logits,
                                           labels=labels, default_top_k=int(self.settings["default_top_k"]))
        return Response(content=content, headers=headers), served
