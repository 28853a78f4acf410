"""The wire shapes of ``embedstream serve``: OpenAI's embeddings request and response,
its error object, and the /search request. Parsing here only checks shapes and limits;
what depends on the model (its name, ``dimensions``) is checked by the app."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

#: ``input_type`` values: Voyage's names, and Cohere's as aliases.
INPUT_TYPES = {
    "query": "query",
    "document": "document",
    "search_query": "query",
    "search_document": "document",
}
#: Fields of an embeddings request. ``user`` is OpenAI's and accepted, unused.
EMBEDDINGS_FIELDS = ("input", "model", "encoding_format", "dimensions", "input_type", "user")
SEARCH_FIELDS = ("query", "k", "filter", "table", "mode", "rerank", "per_document", "fusion")
#: TEI's /rerank request (``raw_scores`` and ``truncate`` are taken and ignored: scores are
#: what the model's activation gives, and pairs are always truncated to the model's limit).
RERANK_FIELDS = ("query", "texts", "return_text", "raw_scores", "truncate")
SEARCH_MODES = ("dense", "sparse", "text", "hybrid")
#: Hybrid's fusion functions (flows.search.FUSIONS).
FUSIONS = ("rrf", "relative")
#: Most hits one /search returns.
MAX_K = 1000


class ApiError(Exception):
    """A request answered with an error in OpenAI's shape:
    ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: Optional[str] = None,
        param: Optional[str] = None,
        headers: Optional[dict[str, str]] = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: Optional[str] = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class EmbeddingsRequest:
    texts: list[str]
    model: Optional[str]
    #: "float" or "base64" (little-endian float32, as OpenAI's).
    encoding_format: str
    dimensions: Optional[int]
    #: "query", "document" or None (the model's default prompt).
    input_type: Optional[str]


@dataclass(frozen=True)
class SearchRequest:
    query: str
    k: int
    filters: dict[str, str]
    table: Optional[str]
    #: dense, sparse, text or hybrid (None: hybrid where the table has a second signal).
    mode: Optional[str] = None
    #: Whether the server's reranker (--rerank) orders the hits.
    rerank: bool = False
    #: One hit per document, as ``embedstream search --per-document``.
    per_document: bool = False
    #: Hybrid's fusion, rrf or relative (None: the server's setting, EMBEDSTREAM_FUSION).
    fusion: Optional[str] = None


@dataclass(frozen=True)
class RerankRequest:
    query: str
    texts: list[str]
    return_text: bool


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise invalid(f"the body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise invalid("the body's JSON is nested too deeply", code="invalid_json") from None


def _object(body: Any, fields: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object", code="invalid_type")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise invalid(
            f"unknown field {unknown[0]!r}; this endpoint takes {', '.join(fields)}",
            param=unknown[0],
            code="unknown_parameter",
        )
    return body


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(
            f"{name} must be an integer, not {type(value).__name__}", param=name, code="invalid_type"
        )
    return value


def parse_embeddings(body: Any, *, max_inputs: int, max_input_chars: int) -> EmbeddingsRequest:
    body = _object(body, EMBEDDINGS_FIELDS)
    if "input" not in body:
        raise invalid("input is required: a string or a list of strings", param="input", code="missing")
    texts = _texts(body["input"], max_inputs, max_input_chars)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model must be a string", param="model", code="invalid_type")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise invalid(f"encoding_format must be float or base64, not {encoding!r}", param="encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and _int(dimensions, "dimensions") < 1:
        raise invalid("dimensions must be at least 1", param="dimensions")
    input_type = body.get("input_type")
    if input_type is not None:
        if input_type not in INPUT_TYPES:
            raise invalid(
                f"input_type must be one of {', '.join(INPUT_TYPES)}, not {input_type!r}", param="input_type"
            )
        input_type = INPUT_TYPES[input_type]
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("user must be a string", param="user", code="invalid_type")
    return EmbeddingsRequest(texts, model, encoding, dimensions, input_type)


def _texts(value: Any, max_inputs: int, max_input_chars: int) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list):
        raise invalid(
            f"input must be a string or a list of strings, not {type(value).__name__}",
            param="input",
            code="invalid_type",
        )
    if not texts:
        raise invalid("input must not be an empty list", param="input", code="empty_input")
    if len(texts) > max_inputs:
        raise invalid(
            f"input has {len(texts)} items; at most {max_inputs} per request (EMBEDSTREAM_SERVE_MAX_INPUTS)",
            param="input",
            code="too_many_inputs",
        )
    for i, text in enumerate(texts):
        if isinstance(text, str):
            if not _unicode(text):
                raise invalid(f"input[{i}] is not valid Unicode (a lone surrogate)", param="input")
            if len(text) > max_input_chars:
                raise ApiError(
                    413,
                    f"input[{i}] has {len(text)} characters; at most {max_input_chars} "
                    "(EMBEDSTREAM_SERVE_MAX_INPUT_CHARS)",
                    param="input",
                    code="input_too_long",
                )
            continue
        if isinstance(text, (int, list)) and not isinstance(text, bool):
            raise invalid(
                "token ids are not accepted: send text, which the server tokenizes with the model's own "
                "tokenizer",
                param="input",
                code="token_ids_not_supported",
            )
        raise invalid(
            f"input[{i}] must be a string, not {type(text).__name__}", param="input", code="invalid_type"
        )
    return texts


def _unicode(text: str) -> bool:
    """JSON's \\uD800 escapes give strings no UTF-8 can hold (nor the tokenizer)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_search(body: Any) -> SearchRequest:
    body = _object(body, SEARCH_FIELDS)
    query = body.get("query")
    if not isinstance(query, str) or not query.strip():
        raise invalid("query is required: a non-empty string", param="query", code="invalid_type")
    if not _unicode(query):
        raise invalid("query is not valid Unicode (a lone surrogate)", param="query")
    k = _int(body.get("k", 5), "k")
    if not 1 <= k <= MAX_K:
        raise invalid(f"k must be between 1 and {MAX_K}", param="k")
    filters = body.get("filter") or {}
    if not isinstance(filters, dict) or not all(
        isinstance(key, str) and isinstance(v, str) and _unicode(key + v) for key, v in filters.items()
    ):
        raise invalid(
            "filter must be an object of metadata keys to string values", param="filter", code="invalid_type"
        )
    table = body.get("table")
    if table is not None and not (isinstance(table, str) and _unicode(table)):
        raise invalid("table must be a string", param="table", code="invalid_type")
    mode = body.get("mode")
    if mode is not None and mode not in SEARCH_MODES:
        raise invalid(f"mode must be one of {', '.join(SEARCH_MODES)}, not {mode!r}", param="mode")
    rerank = body.get("rerank", False)
    if not isinstance(rerank, bool):
        raise invalid("rerank must be true or false", param="rerank", code="invalid_type")
    per_document = body.get("per_document", False)
    if not isinstance(per_document, bool):
        raise invalid("per_document must be true or false", param="per_document", code="invalid_type")
    fusion = body.get("fusion")
    if fusion is not None and not (isinstance(fusion, str) and fusion in FUSIONS):
        raise invalid(f"fusion must be one of {', '.join(FUSIONS)}, not {fusion!r}", param="fusion")
    return SearchRequest(query, k, dict(filters), table, mode, rerank, per_document, fusion)


def parse_rerank(body: Any, *, max_inputs: int, max_input_chars: int) -> RerankRequest:
    """TEI's ``{"query", "texts"}``, with its limits on inputs."""
    body = _object(body, RERANK_FIELDS)
    query = body.get("query")
    if not isinstance(query, str) or not query.strip() or not _unicode(query):
        raise invalid("query is required: a non-empty string", param="query", code="invalid_type")
    texts = body.get("texts")
    if not isinstance(texts, list) or not texts:
        raise invalid("texts is required: a non-empty list of strings", param="texts", code="invalid_type")
    if len(texts) > max_inputs:
        raise invalid(
            f"texts has {len(texts)} items; at most {max_inputs} per request (EMBEDSTREAM_SERVE_MAX_INPUTS)",
            param="texts",
            code="too_many_inputs",
        )
    for i, text in enumerate([query, *texts]):
        where = "query" if i == 0 else f"texts[{i - 1}]"
        if not isinstance(text, str) or not _unicode(text):
            raise invalid(f"{where} must be a string of valid Unicode", param="texts", code="invalid_type")
        if len(text) > max_input_chars:
            raise ApiError(
                413,
                f"{where} has {len(text)} characters; at most {max_input_chars} "
                "(EMBEDSTREAM_SERVE_MAX_INPUT_CHARS)",
                param="texts",
                code="input_too_long",
            )
    for flag in ("return_text", "raw_scores", "truncate"):
        if not isinstance(body.get(flag, False), bool):
            raise invalid(f"{flag} must be true or false", param=flag, code="invalid_type")
    return RerankRequest(query, list(texts), body.get("return_text", False))


def embeddings_body(vectors: np.ndarray, model: str, tokens: int, encoding_format: str) -> dict[str, Any]:
    """OpenAI's response: ``{"object": "list", "data": [...], "model", "usage"}``."""
    if encoding_format == "base64":
        rows: list[Any] = [
            base64.b64encode(np.ascontiguousarray(row, dtype="<f4").tobytes()).decode("ascii")
            for row in vectors
        ]
    else:
        # float64 rows: orjson writes each float32 exactly (as json.dumps of tolist()
        # did), so any client's parser reads back the library's floats bit for bit.
        rows = list(vectors.astype(np.float64))
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
