"""The HTTP API's typed bodies: what `/openapi.json` describes and what the server validates.

Request bodies are declared here and validated by the server itself after it has read the body under its size
limit (so the schema is exact while no framework reads an unbounded body first). Pure pydantic.
"""
from __future__ import annotations

from typing import Annotated, Any, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

MAX_TOP_K = 1000


class ClassifyJSON(BaseModel):
    """JSON body of POST /classify."""

    model_config = ConfigDict(extra="forbid")

    images: list[Annotated[StrictStr, Field(min_length=1)]] = Field(
        min_length=1, description="base64-encoded image files (JPEG, PNG or WebP by default)")
    top_k: Optional[StrictInt] = Field(None, ge=1, le=MAX_TOP_K, description="labels per image (default 5)")


class ClassifyMultipart(BaseModel):
    """Multipart body of POST /classify (documentation of the form; the server parses it)."""

    file: list[bytes] = Field(description="one or more image files (repeat the field)",
                              json_schema_extra={"items": {"type": "string", "format": "binary"}})
    top_k: Optional[int] = Field(None, ge=1, le=MAX_TOP_K)


class Label(BaseModel):
    label: str
    class_id: int
    score: float


class Prediction(Label):
    top_k: list[Label]


class ClassifyResponse(BaseModel):
    model_version: int = Field(description="the version that answered")
    canary: bool = Field(False, description="true when the canary sent this request to the newest candidate")
    predictions: list[Prediction]


class ErrorBody(BaseModel):
    """Every error, whatever the route or status."""

    error: str
    status: int
    detail: Optional[Any] = None


def error_responses(*codes: int) -> dict[int, dict[str, Any]]:
    return {c: {"model": ErrorBody} for c in codes}


def openapi_body(json_model: type[BaseModel], multipart_model: type[BaseModel]) -> dict[str, Any]:
    """An `openapi_extra` requestBody with both content types."""
    multipart = multipart_model.model_json_schema()
    multipart["properties"]["file"] = {"type": "array", "items": {"type": "string", "format": "binary"},
                                       "minItems": 1, "description": "image files"}
    return {"parameters": [
        {"name": "version", "in": "query", "required": False, "description": "answer with this version (default: "
         "the live one)", "schema": {"type": "integer", "minimum": 1}},
        {"name": "top_k", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1,
                                                                        "maximum": MAX_TOP_K}},
    ], "requestBody": {"required": True, "content": {
        "application/json": {"schema": json_model.model_json_schema()},
        "multipart/form-data": {"schema": multipart},
    }}}
