"""An ASGI guard in front of MLflow's scoring app, so that the app can face clients we do not trust.

MLflow 3.17's scoring server (``mlflow models serve``) answers a request without Content-Type and
JSON nested 100,000 deep with a bare 500, has no request size limit, and puts the request in its
400s ("...\\nInput: \\n<the whole body>", "Failed to predict data '<the input table>'"). The guard
checks what it can before the app sees the request, and rewrites every error the app answers:

- size: at most ``max_request_bytes`` (413), from Content-Length and again while the body streams
  in (a chunked body, or one whose Content-Length lies);
- POST /invocations: the Content-Type MLflow accepts for JSON or CSV, with at most a ``charset``
  of utf-8 parameter, else 415 (MLflow's own check crashes on a missing header);
- JSON nesting: at most ``max_depth`` levels, counted on the bytes before anything parses them
  (400; Python's json module recurses once per level);
- errors: one JSON shape, ``{"error_code", "message"}``, whose message never carries the request:
  MLflow's known echoes are cut, the message is cut to its first line and ``MESSAGE_LIMIT``
  characters, and any run of ``ECHO_RUN`` or more characters also found in the body is masked;
  no stack trace;
- an exception the app lets escape (a 500): 400 where it rose while reading the request (bad
  JSON numbers, bad CSV), 500 otherwise (a genuine failure), both with a fixed message.

Standard library only, free of click and MLflow: scenesweep.serving.app puts it around the app.
"""
from __future__ import annotations

import array
import asyncio
import dataclasses
import itertools
import json
import logging
import re
import traceback
from typing import Any, Awaitable, Callable

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_MB = 16  # 512 images (the model's own limit per request) of ~24 kB each, base64
DEFAULT_MAX_DEPTH = 64  # the classifier's payloads nest 4 deep; json recursion fails near 1000
INVOCATIONS = "/invocations"
JSON_TYPE, CSV_TYPE = "application/json", "text/csv"
ACCEPTED_TYPES = (JSON_TYPE, CSV_TYPE)  # MLflow also takes Parquet: a binary format not parsed here
MESSAGE_LIMIT = 240  # characters of an inner error message kept (its first line)
# An echo is found by looking up windows of WINDOW characters, every STEP characters, in the body:
# any shared run of WINDOW + STEP - 1 characters holds one whole window and is masked.
WINDOW, STEP = 8, 5
ECHO_RUN = WINDOW + STEP - 1
MASK = "…"
HELD_LIMIT = 64 * 1024  # bytes of an inner error body read (MLflow's can be the whole request)
THREAD_ABOVE = 256 * 1024  # scans of bodies larger than this run off the event loop
FALLBACK_CODES = {404: "ENDPOINT_NOT_FOUND", 413: "REQUEST_LIMIT_EXCEEDED", 504: "DEADLINE_EXCEEDED"}
# Functions of MLflow's scoring server that read the request: an exception from under them is the
# request's fault (e.g. json's ValueError on a 5000-digit number), so a 400, not a 500.
PARSING_FUNCTIONS = frozenset({"_decode_json_input", "_parse_json_data", "_split_data_and_params",
                               "infer_and_parse_data", "parse_csv_input", "parse_parquet_input",
                               "dataframe_from_parsed_json", "parse_tf_serving_input"})
_JSON_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"')  # possessive: no backtracking
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_ONE_BRACKET_KIND = bytes.maketrans(b"{}", b"[]")
_PLUS_MINUS_ONE = bytes.maketrans(b"[]", b"\x01\xff")  # as signed bytes: +1, -1
_ERROR_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may be. ``max_request_bytes``: the body; ``max_depth``: JSON nesting."""

    max_request_bytes: int = DEFAULT_MAX_REQUEST_MB * 2**20
    max_depth: int = DEFAULT_MAX_DEPTH


class Refusal(Exception):
    """A request answered by the guard: HTTP ``status``, MLflow-style ``error_code``, ``message``."""

    def __init__(self, status: int, error_code: str, message: str):
        super().__init__(message)
        self.status, self.error_code, self.message = status, error_code, message


class ClientGone(Exception):
    """The client disconnected before its body arrived: nothing to answer."""


def refuse_content_type(value: str | None) -> str:
    """The media type of a request to /invocations, parsed as MLflow parses it.

    Raises:
        Refusal: 415 for a missing header, another type, a parameter other than ``charset`` or
            a charset other than utf-8 (MLflow's rules, so that it never answers 415 itself; the
            message names what is accepted, not what was sent).
    """
    accepted = f"send Content-Type: {' or '.join(ACCEPTED_TYPES)} (optionally with charset=utf-8)"
    if not value:
        raise Refusal(415, "INVALID_PARAMETER_VALUE", f"missing Content-Type: {accepted}")
    media_type, *parameters = [part.strip() for part in value.split(";")]
    pairs = [parameter.partition("=") for parameter in parameters]
    if media_type not in ACCEPTED_TYPES or any(key != "charset" or v.lower() != "utf-8" for key, _, v in pairs):
        raise Refusal(415, "INVALID_PARAMETER_VALUE", f"unsupported Content-Type: {accepted}")
    return media_type


def json_too_deep(body: bytes, max_depth: int) -> bool:
    """Whether JSON ``body`` nests more than ``max_depth`` arrays/objects, brackets inside
    strings not counted; unclosed brackets count as open (a parser recurses into them first).

    No Python loop per byte: the common case, no more opening brackets than ``max_depth`` at all,
    is two ``count``s; else strings are cut out by a regular expression, the rest reduced to
    its brackets, and the depth is the running sum of +1/-1 (``itertools.accumulate``, in C).
    At worst (16 MiB of short strings and brackets) about 2 s of CPU on 2 cores, in a thread.
    """
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return False  # an upper bound: brackets in strings counted too
    brackets = _JSON_STRING.sub(b"", body).translate(_ONE_BRACKET_KIND, _NOT_BRACKETS)
    if b"[" * (max_depth + 1) in brackets:  # a run of openings: the 100,000-deep request, at once
        return True
    depths = itertools.accumulate(array.array("b", brackets.translate(_PLUS_MINUS_ONE)))
    return max(depths, default=0) > max_depth


def _cut_known_echoes(message: str) -> str:
    """MLflow 3.17's error templates that quote the request, cut where the quotation starts."""
    message = message.split("\nInput:", 1)[0]  # "Ensure that input is a valid JSON ...\nInput: \n<body>"
    if "UnicodeDecodeError(" in message:  # its repr holds the bytes that failed
        message = message.split("Error:", 1)[0] + "Error: the body is not valid UTF-8"
    if message.startswith("Failed to predict data '") and "\nError: " in message:
        message = message.rsplit("\nError: ", 1)[1]  # "Failed to predict data '<table>'. \nError: <why>"
    if message.startswith("Failed to enforce schema of data '") and ". Error: " in message:
        message = "Failed to enforce schema. Error: " + message.rsplit(". Error: ", 1)[1]
    return message


def _protected(message: str, safe_words: tuple[str, ...]) -> list[bool]:
    """Which characters of ``message`` belong to a safe word (a protocol key, a column name)."""
    protected = [False] * len(message)
    for word in safe_words:
        for found in re.finditer(re.escape(word), message):
            protected[found.start():found.end()] = [True] * len(word)
    return protected


def _in(text: str, body: bytes) -> bool:
    return text.encode("utf-8", "replace") in body


def _echo_spans(message: str, body: bytes, safe_words: tuple[str, ...]) -> list[tuple[int, int]]:
    """(start, end) of the parts of ``message`` found in ``body``: each window found, widened at
    the edges of a run of found windows by up to STEP - 1 characters, as far as the body has them."""
    protected = _protected(message, safe_words)
    found = {start for start in range(0, len(message) - WINDOW + 1, STEP)
             if not all(protected[start:start + WINDOW]) and _in(message[start:start + WINDOW], body)}
    spans = []
    for start in sorted(found):
        low, high = start, start + WINDOW
        for _ in range(STEP - 1 if start - STEP not in found else 0):  # the run's first window
            if low == 0 or not _in(message[low - 1:high], body):
                break
            low -= 1
        for _ in range(STEP - 1 if start + STEP not in found else 0):  # the run's last window
            if high == len(message) or not _in(message[low:high + 1], body):
                break
            high += 1
        spans.append((low, high))
    return spans


def mask_echoes(message: str, body: bytes, safe_words: tuple[str, ...] = ()) -> str:
    """``message`` with every run of ``ECHO_RUN`` or more characters that also occurs in ``body``
    replaced by ``MASK``; windows made only of ``safe_words`` are not looked up (the request
    names them too: "dataframe_split", "image").

    Costs one substring search of the body per window, ~50 for a whole message, and up to 8 per
    run found: a few ms for a small body, up to about a second on 2 cores for a 16 MiB one (then
    off the event loop).
    """
    masked = [False] * len(message)
    for low, high in _echo_spans(message, body, safe_words):
        masked[low:high] = [True] * (high - low)
    out, previous = [], False
    for char, hidden in zip(message, masked):
        if not hidden:
            out.append(char)
        elif not previous:
            out.append(MASK)
        previous = hidden
    return "".join(out)


def safe_message(message: str, body: bytes, safe_words: tuple[str, ...] = ()) -> str:
    """An inner error message fit to answer: known echoes cut, its first line, at most
    ``MESSAGE_LIMIT`` characters, runs shared with the request masked."""
    lines = [line.strip() for line in _cut_known_echoes(message).splitlines() if line.strip()]
    first = lines[0][:MESSAGE_LIMIT] if lines else ""
    return mask_echoes(first, body, safe_words)


def error_body(error_code: str, message: str) -> bytes:
    return json.dumps({"error_code": error_code, "message": message}).encode("utf-8")


def _fallback_code(status: int) -> str:
    return FALLBACK_CODES.get(status, "BAD_REQUEST" if status < 500 else "INTERNAL_ERROR")


def _json_string_prefix(text: str, key: str) -> str | None:
    """The value of ``"key": "..."`` in JSON text that may be cut off (its start, then)."""
    found = re.search(rf'"{key}": ?"((?:[^"\\]|\\.)*)', text)
    if found is None:
        return None
    raw = re.sub(r"\\(u[0-9a-fA-F]{0,3})?$", "", found.group(1))  # an escape cut in half
    try:
        return json.loads(f'"{raw}"')
    except ValueError:
        return raw


def _error_fields(held: bytes) -> tuple[object, object]:
    """(error_code, message) of an error answer: MLflow's JSON (its ``message``; FastAPI's
    ``detail``), perhaps cut off at HELD_LIMIT (MLflow's can hold the whole request), or text
    (MLflow's 504 and 415 are plain text)."""
    try:
        parsed = json.loads(held)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        return parsed.get("error_code"), parsed.get("message", parsed.get("detail"))
    text = held.decode("utf-8", "replace")
    if text.startswith("{"):
        return _json_string_prefix(text, "error_code"), _json_string_prefix(text, "message")
    return None, text


def inner_error(status: int, held: bytes, body: bytes, safe_words: tuple[str, ...]) -> Refusal:
    """The app's error answer (``held``, its first HELD_LIMIT bytes) rewritten: its status and
    error_code, its message made safe (see ``safe_message``)."""
    code, text = _error_fields(held)
    code = code if isinstance(code, str) and _ERROR_CODE.fullmatch(code) else _fallback_code(status)
    message = safe_message(text, body, safe_words) if isinstance(text, str) else ""
    return Refusal(status, code, message or f"the request was refused ({status})")


def exception_refusal(error: BaseException) -> Refusal:
    """An exception the app let escape: 400 when it rose while reading the request, else 500."""
    frames = {frame.f_code.co_name for frame, _ in traceback.walk_tb(error.__traceback__)}
    if isinstance(error, RecursionError) or frames & PARSING_FUNCTIONS:
        return Refusal(400, "BAD_REQUEST", "the request body could not be read as model input "
                                           f"({type(error).__name__})")
    return Refusal(500, "INTERNAL_ERROR", "the model server failed on this request (see its log)")


async def _scan(body: bytes, function: Callable, *args):
    """``function(body, *args)``: in a thread when the body is large, so other requests flow on."""
    if len(body) > THREAD_ABOVE:
        return await asyncio.to_thread(function, body, *args)
    return function(body, *args)


class _HeldResponse:
    """The ``send`` given to the app: success answers pass straight through; an error answer
    (status >= 400) is held, its first HELD_LIMIT bytes kept, for the guard to rewrite."""

    def __init__(self, send: Send):
        self.send = send
        self.status: int | None = None
        self.passing = False
        self.body = bytearray()

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.passing = self.status < 400
        elif message["type"] == "http.response.body" and not self.passing:
            self.body += message.get("body", b"")[:max(0, HELD_LIMIT - len(self.body))]
            return
        if self.passing:
            await self.send(message)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _too_large(limit: int) -> Refusal:
    return Refusal(413, "REQUEST_LIMIT_EXCEEDED",
                   f"request body larger than {limit / 2**20:g} MiB (the server's --max-request-mb)")


def refuse_declared_length(scope: Scope, limit: int) -> None:
    """Refuses (413) a request whose Content-Length exceeds ``limit``, before reading its body
    (uvicorn then reads and drops the rest, so that the client can read the answer)."""
    length = _header(scope, b"content-length")
    if length is not None and length.strip().isdigit() and int(length) > limit:
        raise _too_large(limit)  # (a Content-Length that is no number: uvicorn answers 400 itself)


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body, refused (413) as soon as the bytes received pass ``limit``: a
    chunked body, or one whose Content-Length was not checked or lies.

    Raises:
        Refusal: 413.
        ClientGone: the client left first.
    """
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class Guard:
    """ASGI middleware: ``Guard(app, Limits(...), safe_words)`` (see the module's docstring).

    Args:
        app: the ASGI app guarded (MLflow's scoring app).
        limits: request size and JSON depth.
        safe_words: words an error message may repeat from the request (the input format keys,
            the model's column names): never masked.
    """

    def __init__(self, app: ASGIApp, limits: Limits = Limits(), safe_words: tuple[str, ...] = ()):
        self.app, self.limits, self.safe_words = app, limits, tuple(safe_words)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan: nothing to guard
            await self.app(scope, receive, send)
            return
        try:
            # In this order: the declared size, the media type, then the body as it arrives.
            refuse_declared_length(scope, self.limits.max_request_bytes)
            invocation = scope["method"] == "POST" and scope["path"] == INVOCATIONS
            media_type = refuse_content_type(_header(scope, b"content-type")) if invocation else None
            body = await read_body(receive, self.limits.max_request_bytes)
            if media_type == JSON_TYPE and await _scan(body, json_too_deep, self.limits.max_depth):
                raise Refusal(400, "BAD_REQUEST", f"JSON nested deeper than {self.limits.max_depth} levels")
            await self._call_app(scope, body, receive, send)
        except ClientGone:
            return
        except Refusal as refusal:
            await self._answer(send, refusal)

    async def _call_app(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        """The app on the body read (replayed as one message); its error answers rewritten."""
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then: the disconnect, when it comes

        held = _HeldResponse(send)
        try:
            await self.app(scope, replay, held)
        except Exception as error:  # Starlette answered 500 and raised it again
            if held.passing:
                raise
            refusal = exception_refusal(error)
            log = logger.warning if refusal.status < 500 else logger.error
            log("%s %s -> %d: %s", scope["method"], scope["path"], refusal.status, type(error).__name__,
                exc_info=refusal.status >= 500)
            raise refusal from None
        if not held.passing and held.status is not None:
            raise await _scan(body, _rewrite, held, self.safe_words)  # answered by __call__

    @staticmethod
    async def _answer(send: Send, refusal: Refusal) -> None:
        content = error_body(refusal.error_code, refusal.message)
        await send({"type": "http.response.start", "status": refusal.status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})


def _rewrite(body: bytes, held: _HeldResponse, safe_words: tuple[str, ...]) -> Refusal:
    return inner_error(held.status, bytes(held.body), body, safe_words)
