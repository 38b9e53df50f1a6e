"""The test Cloud Storage server's contract (tests/gcs_server.py): raw JSON-API requests and the
answers real GCS gives (preconditions, generation headers, listings, resumable uploads, compose,
rewrite, copy), its fault injection, and the three clients the project uses (google-cloud-storage,
gcsfs, TensorStore) round-tripping objects through it."""

import http.client
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import types
import urllib.parse
import uuid

import pytest

from tests.gcs_server import GcsServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OBJ = "/storage/v1/b/bucket/o"
UPLOAD = "/upload/storage/v1/b/bucket/o"


@pytest.fixture(scope="module")
def server():
    with GcsServer() as running:
        yield running


@pytest.fixture(autouse=True)
def fresh(server):
    server.clear_faults()
    server.clear_requests()
    yield
    server.clear_faults()


@pytest.fixture
def name():
    """A new object name with a '/' (so it travels percent-encoded)."""
    return f"t/{uuid.uuid4().hex[:12]}"


def q(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def call(server, method, target, body=None, headers=None, conn=None):
    """One request: (status, lower-cased headers, body)."""
    own = conn is None
    conn = conn or http.client.HTTPConnection(server.emulator_host.removeprefix("http://"),
                                              timeout=10)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        if own:
            conn.close()


def put(server, name, data=b"data"):
    status, _, body = call(server, "POST", f"{UPLOAD}?uploadType=media&name={q(name)}", data)
    assert status == 200, body
    return json.loads(body)


def multipart(name, data):
    meta = json.dumps({"name": name}).encode()
    body = (b"--B\r\nContent-Type: application/json\r\n\r\n" + meta + b"\r\n--B\r\n"
            b"Content-Type: text/plain\r\n\r\n" + data + b"\r\n--B--\r\n")
    return body, {"Content-Type": "multipart/related; boundary=B"}


def test_generation_preconditions_hold_as_on_gcs(server, name):
    """One object through a table of conditional requests; each row's status is GCS's."""
    created = call(server, "POST", f"{UPLOAD}?uploadType=media&name={q(name)}&ifGenerationMatch=0",
                   b"one")
    assert created[0] == 200, created
    gen = int(json.loads(created[2])["generation"])
    wrong = gen + 1
    parts, parts_headers = multipart(name, b"two")
    rows = [
        ("create if absent, again", "POST",
         f"{UPLOAD}?uploadType=media&name={q(name)}&ifGenerationMatch=0", b"x", None, 412),
        ("multipart create if absent", "POST", f"{UPLOAD}?uploadType=multipart&ifGenerationMatch=0",
         parts, parts_headers, 412),
        ("replace a stale generation", "POST",
         f"{UPLOAD}?uploadType=media&name={q(name)}&ifGenerationMatch={wrong}", b"x", None, 412),
        ("download, wrong generation", "GET",
         f"{OBJ}/{q(name)}?alt=media&ifGenerationMatch={wrong}", None, None, 412),
        ("/download route, wrong generation", "GET",
         f"/download{OBJ}/{q(name)}?alt=media&ifGenerationMatch={wrong}", None, None, 412),
        ("metadata, wrong generation", "GET", f"{OBJ}/{q(name)}?ifGenerationMatch={wrong}",
         None, None, 412),
        ("download, live generation", "GET", f"{OBJ}/{q(name)}?alt=media&ifGenerationMatch={gen}",
         None, None, 200),
        ("download unless live", "GET", f"{OBJ}/{q(name)}?alt=media&ifGenerationNotMatch={gen}",
         None, None, 304),
        ("metadata unless live", "GET", f"{OBJ}/{q(name)}?ifGenerationNotMatch={gen}",
         None, None, 304),
        ("HEAD unless live", "HEAD", f"/download{OBJ}/{q(name)}?ifGenerationNotMatch={gen}",
         None, None, 304),
        ("download unless another", "GET",
         f"{OBJ}/{q(name)}?alt=media&ifGenerationNotMatch={wrong}", None, None, 200),
        ("metageneration 1 (the backend's only one)", "GET",
         f"{OBJ}/{q(name)}?alt=media&ifMetagenerationMatch=2", None, None, 412),
        ("delete, stale generation", "DELETE", f"{OBJ}/{q(name)}?ifGenerationMatch={wrong}",
         None, None, 412),
        ("delete unless live", "DELETE", f"{OBJ}/{q(name)}?ifGenerationNotMatch={gen}",
         None, None, 412),
        ("still there", "GET", f"{OBJ}/{q(name)}?alt=media", None, None, 200),
        ("not a number", "GET", f"{OBJ}/{q(name)}?alt=media&ifGenerationMatch=x", None, None, 400),
        ("delete, live generation", "DELETE", f"{OBJ}/{q(name)}?ifGenerationMatch={gen}",
         None, None, 204),
        ("gone", "GET", f"{OBJ}/{q(name)}", None, None, 404),
        ("a missing object's read is 404 whatever its preconditions", "GET",
         f"{OBJ}/{q(name)}?alt=media&ifGenerationMatch={gen}", None, None, 404),
        ("create if absent, now absent", "POST",
         f"{UPLOAD}?uploadType=media&name={q(name)}&ifGenerationMatch=0", b"three", None, 200),
    ]
    got = []
    for what, method, target, sent, sent_headers, _ in rows:
        status, headers, answer = call(server, method, target, sent, sent_headers)
        got.append((what, status))
        if status == 304:
            assert answer == b"" and headers["x-goog-generation"] == str(gen), what
        if status == 412:
            assert json.loads(answer)["error"]["code"] == 412, what
    assert got == [(what, status) for what, *_, status in rows]
    assert call(server, "GET", f"{OBJ}/{q(name)}?alt=media")[2] == b"three"


def test_racing_creates_if_absent_have_one_winner(server, name):
    """Simple uploads, whose precondition only the proxy checks: check and write are one step."""
    barrier, statuses = threading.Barrier(8), []

    def create(n):
        barrier.wait()
        statuses.append(call(server, "POST", f"{UPLOAD}?uploadType=media&name={q(name)}"
                             "&ifGenerationMatch=0", f"racer {n}".encode())[0])

    racers = [threading.Thread(target=create, args=(n,)) for n in range(8)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()
    assert sorted(statuses) == [200] + [412] * 7


@pytest.mark.parametrize("method,route", [
    ("GET", "{o}/{name}"), ("GET", "{o}/{name}?alt=media"), ("GET", "/download{o}/{name}"),
    ("GET", "/download{o}/{name}?alt=media"), ("HEAD", "{o}/{name}"),
    ("HEAD", "/download{o}/{name}"), ("GET", "{o}/{name}?alt=media&ifGenerationMatch={gen}"),
])
def test_every_read_route_carries_the_generation(server, name, method, route):
    gen = put(server, name, b"12345")["generation"]
    status, headers, _ = call(server, method, route.format(o=OBJ, name=q(name), gen=gen))
    assert status == 200
    assert headers["x-goog-generation"] == gen
    assert headers["x-goog-metageneration"] == "1"


def test_listings_honour_prefix_delimiter_and_offsets(server, name):
    for leaf in ("a", "b", "c", "d/e", "d/f"):
        put(server, f"{name}/{leaf}")

    def listing(query):
        status, _, body = call(server, "GET", f"{OBJ}?prefix={q(name + '/')}&{query}")
        assert status == 200
        page = json.loads(body)
        return ([item["name"].removeprefix(name + "/") for item in page.get("items", [])],
                [p.removeprefix(name + "/") for p in page.get("prefixes", [])])

    assert listing("delimiter=/") == (["a", "b", "c"], ["d/"])
    assert listing(f"startOffset={q(name + '/b')}&endOffset={q(name + '/d/f')}") == (
        ["b", "c", "d/e"], [])
    assert call(server, "GET", f"{OBJ}?matchGlob=**")[0] == 501  # ignored by the backend


def test_a_large_listing_streams_back_on_one_kept_alive_connection(server, name):
    """Responses without a length come back chunked; the connection serves the next request."""
    for n in range(40):
        put(server, f"{name}/{n:02d}", b"x")
    conn = http.client.HTTPConnection(server.emulator_host.removeprefix("http://"), timeout=10)
    try:
        status, _, body = call(server, "GET", f"{OBJ}?prefix={q(name + '/')}", conn=conn)
        assert status == 200 and len(json.loads(body)["items"]) == 40
        conn.request("POST", f"{UPLOAD}?uploadType=media&name={q(name + '/c')}",
                     body=iter([b"chu", b"nked"]), encode_chunked=True)  # a chunked request
        response = conn.getresponse()
        assert response.status == 200, response.read()
        response.read()
        assert call(server, "GET", f"{OBJ}/{q(name + '/c')}?alt=media", conn=conn)[2] == b"chunked"
    finally:
        conn.close()


def test_a_resumable_upload_goes_through_the_proxy_and_keeps_its_precondition(server, name):
    status, headers, _ = call(server, "POST", f"{UPLOAD}?uploadType=resumable&ifGenerationMatch=0",
                              json.dumps({"name": name}), {"Content-Type": "application/json"})
    assert status == 200
    session = headers["location"]
    assert session.startswith(server.emulator_host + "/"), session
    path = session.removeprefix(server.emulator_host)
    first = call(server, "PUT", path, b"abcd", {"Content-Range": "bytes 0-3/8"})
    assert first[0] == 308
    last = call(server, "PUT", path, b"efgh", {"Content-Range": "bytes 4-7/8"})
    assert last[0] == 200 and json.loads(last[2])["size"] == "8"
    assert call(server, "GET", f"{OBJ}/{q(name)}?alt=media")[2] == b"abcdefgh"

    # Another writer comes first while a must-not-exist upload is under way: it fails at commit.
    other = name + "-raced"
    status, headers, _ = call(server, "POST", f"{UPLOAD}?uploadType=resumable&ifGenerationMatch=0",
                              json.dumps({"name": other}), {"Content-Type": "application/json"})
    path = headers["location"].removeprefix(server.emulator_host)
    assert call(server, "PUT", path, b"abcd", {"Content-Range": "bytes 0-3/8"})[0] == 308
    put(server, other, b"winner")
    assert call(server, "PUT", path, b"efgh", {"Content-Range": "bytes 4-7/8"})[0] == 412
    assert call(server, "GET", f"{OBJ}/{q(other)}?alt=media")[2] == b"winner"


def test_compose_rewrite_copy_and_move(server, name):
    a, b = put(server, name + "/a", b"left-"), put(server, name + "/b", b"right")
    compose = f"{OBJ}/{q(name + '/ab')}/compose"
    request = {"sourceObjects": [{"name": name + "/a"}, {"name": name + "/b"}]}
    assert call(server, "POST", compose, json.dumps(request))[0] == 200
    assert call(server, "GET", f"{OBJ}/{q(name + '/ab')}?alt=media")[2] == b"left-right"
    assert call(server, "POST", compose + "?ifGenerationMatch=0", json.dumps(request))[0] == 412
    stale = {"sourceObjects": [{"name": name + "/a", "objectPreconditions": {
        "ifGenerationMatch": int(a["generation"]) + 1}}]}
    assert call(server, "POST", compose, json.dumps(stale))[0] == 412
    missing = {"sourceObjects": [{"name": name + "/none"}]}
    assert call(server, "POST", compose, json.dumps(missing))[0] == 404

    rewrite = f"{OBJ}/{q(name + '/b')}/rewriteTo/b/bucket/o/{q(name + '/rw')}"
    status, _, body = call(server, "POST", rewrite, b"")
    assert status == 200 and json.loads(body)["done"] is True
    assert call(server, "GET", f"{OBJ}/{q(name + '/rw')}?alt=media")[2] == b"right"
    assert call(server, "POST", rewrite + "?ifGenerationMatch=0", b"")[0] == 412
    assert call(server, "POST", rewrite + f"?ifSourceGenerationMatch={b['generation']}1",
                b"")[0] == 412

    copy = f"{OBJ}/{q(name + '/a')}/copyTo/b/bucket/o/{q(name + '/cp')}"
    assert call(server, "POST", copy + "?ifGenerationMatch=0", b"")[0] == 200
    assert call(server, "GET", f"{OBJ}/{q(name + '/cp')}?alt=media")[2] == b"left-"
    assert call(server, "POST", copy + "?ifGenerationMatch=0", b"")[0] == 412

    move = f"{OBJ}/{q(name + '/cp')}/moveTo/o/{q(name + '/mv')}"
    assert call(server, "POST", move + "?ifGenerationMatch=0", b"")[0] == 501  # not ignored
    assert call(server, "POST", move, b"")[0] == 200
    assert call(server, "GET", f"{OBJ}/{q(name + '/mv')}?alt=media")[2] == b"left-"
    assert call(server, "GET", f"{OBJ}/{q(name + '/cp')}")[0] == 404  # moved, not copied


def test_injected_errors_come_first_then_the_real_answer(server, name):
    put(server, name)
    fault = server.inject(503, count=2, method="GET", path_regex=q(name))
    statuses = []
    for _ in range(3):
        status, headers, body = call(server, "GET", f"{OBJ}/{q(name)}?alt=media")
        statuses.append(status)
        if status == 503:
            assert headers["retry-after"] == "0"
            assert json.loads(body)["error"]["code"] == 503
    assert statuses == [503, 503, 200] and fault.fired == 2
    server.inject(429, count=1, after=1, method="GET", path_regex=q(name))
    assert [call(server, "GET", f"{OBJ}/{q(name)}")[0] for _ in range(3)] == [200, 429, 200]
    gets = [r.status for r in server.requests if r.method == "GET"]
    assert gets == [503, 503, 200, 200, 429, 200]


def test_an_injected_fault_leaves_a_kept_alive_connection_usable(server, name):
    conn = http.client.HTTPConnection(server.emulator_host.removeprefix("http://"), timeout=10)
    server.inject(503, count=1, method="POST")
    try:
        target = f"{UPLOAD}?uploadType=media&name={q(name)}"
        assert call(server, "POST", target, b"x" * 100_000, conn=conn)[0] == 503
        assert call(server, "POST", target, b"y" * 100_000, conn=conn)[0] == 200
    finally:
        conn.close()


def test_probabilistic_faults_follow_the_seed(server, name):
    put(server, name)
    patterns = []
    for seed in (7, 7):
        with GcsServer(seed=seed) as own:
            put(own, name)
            own.inject(503, probability=0.5, path_regex="alt=media")
            patterns.append([call(own, "GET", f"{OBJ}/{q(name)}?alt=media")[0] for _ in range(12)])
    assert patterns[0] == patterns[1]
    assert {503, 200} == set(patterns[0])


def test_a_dropped_connection_is_closed_without_an_answer(server, name):
    put(server, name)
    server.inject(drop=True, count=1, method="GET")
    with pytest.raises(http.client.RemoteDisconnected):
        call(server, "GET", f"{OBJ}/{q(name)}?alt=media")
    assert call(server, "GET", f"{OBJ}/{q(name)}?alt=media")[0] == 200
    assert [r.status for r in server.requests[-2:]] == [None, 200], server.requests


def test_a_lost_answer_after_the_write_makes_the_retry_meet_the_precondition(server, name):
    """stage='response': the backend acted, the client hears nothing; a retried create-if-absent
    then gets 412, as it would from GCS."""
    server.inject(drop=True, count=1, stage="response", method="POST")
    target = f"{UPLOAD}?uploadType=media&name={q(name)}&ifGenerationMatch=0"
    with pytest.raises(http.client.RemoteDisconnected):
        call(server, "POST", target, b"first")
    assert call(server, "POST", target, b"second")[0] == 412
    assert call(server, "GET", f"{OBJ}/{q(name)}?alt=media")[2] == b"first"


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_an_upload_whose_client_dies_mid_body_writes_nothing(server, name, framing):
    """A killed writer's half-sent object never appears (the backend sees a cut request)."""
    head = f"POST {UPLOAD}?uploadType=media&name={q(name)} HTTP/1.1\r\nHost: x\r\n"
    head += ("Content-Length: 1000\r\n\r\n" if framing == "length"
             else "Transfer-Encoding: chunked\r\n\r\n3e8\r\n")
    address = server.emulator_host.removeprefix("http://").split(":")
    with socket.create_connection((address[0], int(address[1]))) as client:
        client.sendall(head.encode() + b"x" * 10)
    deadline = time.monotonic() + 5
    while not server.requests and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [r.status for r in server.requests] in ([None], [502])
    assert call(server, "GET", f"{OBJ}/{q(name)}")[0] == 404


def test_injected_latency_delays_the_answer(server, name):
    put(server, name)
    server.inject(latency=0.3, count=1, method="GET")
    started = time.monotonic()
    assert call(server, "GET", f"{OBJ}/{q(name)}")[0] == 200
    delayed = time.monotonic() - started
    started = time.monotonic()
    call(server, "GET", f"{OBJ}/{q(name)}")
    assert delayed >= 0.3 > time.monotonic() - started


def test_a_server_run_as_a_command_is_configured_over_http(name):
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "gcs_server.py"),
                                "0"], stdout=subprocess.PIPE, text=True)
    try:
        host = process.stdout.readline().strip()
        assert host.startswith("http://127.0.0.1:"), host
        remote = types.SimpleNamespace(emulator_host=host)

        status, _, body = call(remote, "POST", "/_faults", json.dumps(
            {"status": 503, "count": 1, "method": "POST"}))
        assert status == 200 and json.loads(body)["fault"]["count"] == 1
        target = f"{UPLOAD}?uploadType=media&name={q(name)}"
        assert [call(remote, "POST", target, b"x")[0] for _ in range(2)] == [503, 200]
        log = json.loads(call(remote, "GET", "/_requests")[2])["requests"]
        assert [entry[3] for entry in log] == [503, 200]
        assert call(remote, "DELETE", "/_faults")[0] == 200
        assert json.loads(call(remote, "GET", "/_faults")[2])["faults"] == []
        assert call(remote, "POST", "/_faults", json.dumps({"status": 503, "drop": True}))[0] == 400
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0


# -- the clients -----------------------------------------------------------------------------


@pytest.fixture
def client_env(server, monkeypatch):
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    return server.env


def gcs_bucket():
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(project="test", credentials=AnonymousCredentials()).bucket("bucket")


def test_google_cloud_storage_round_trips(client_env, server, name):
    from google.api_core import exceptions

    bucket = gcs_bucket()
    bucket.blob(name).upload_from_string(b"small", if_generation_match=0)
    with pytest.raises(exceptions.PreconditionFailed):
        bucket.blob(name).upload_from_string(b"again", if_generation_match=0)
    blob = bucket.get_blob(name)
    assert blob.download_as_bytes(if_generation_match=blob.generation) == b"small"
    big = os.urandom(600 * 1024)
    with bucket.blob(name + "/big").open("wb", chunk_size=256 * 1024, if_generation_match=0) as f:
        f.write(big)  # a resumable upload, three pieces
    assert bucket.blob(name + "/big").download_as_bytes() == big
    assert [b.name for b in bucket.list_blobs(prefix=name)] == [name, name + "/big"]
    with pytest.raises(exceptions.PreconditionFailed):
        bucket.blob(name).delete(if_generation_match=blob.generation + 1)
    bucket.blob(name).delete(if_generation_match=blob.generation)
    assert bucket.get_blob(name) is None
    assert any(r.query.startswith("uploadType=resumable") for r in server.requests)


def test_google_cloud_storage_retries_through_two_503s(client_env, server, name):
    from google.cloud.storage.retry import DEFAULT_RETRY

    server.inject(503, count=2, method="POST", path_regex="^/upload/")
    blob = gcs_bucket().blob(name)
    blob.upload_from_string(b"persistent", if_generation_match=0,
                            retry=DEFAULT_RETRY.with_delay(initial=0.01, maximum=0.05))
    assert blob.download_as_bytes() == b"persistent"
    assert [r.status for r in server.requests if r.method == "POST"] == [503, 503, 200]


def test_gcsfs_round_trips(client_env, name):
    gcsfs = pytest.importorskip("gcsfs.core")

    fs = gcsfs.GCSFileSystem(token="anon", skip_instance_cache=True)
    fs.pipe(f"bucket/{name}/small", b"fsspec")
    big = os.urandom(600 * 1024)
    with fs.open(f"bucket/{name}/big", "wb", block_size=256 * 1024) as f:
        f.write(big)  # a resumable upload
    assert fs.cat(f"bucket/{name}/small") == b"fsspec"
    assert fs.cat(f"bucket/{name}/big") == big
    assert sorted(fs.ls(f"bucket/{name}")) == [f"bucket/{name}/big", f"bucket/{name}/small"]
    fs.rm(f"bucket/{name}/small")
    assert not fs.exists(f"bucket/{name}/small")


TENSORSTORE = textwrap.dedent("""
    import sys
    import tensorstore as ts
    kv = ts.KvStore.open({"driver": "gcs", "bucket": "bucket", "path": sys.argv[1] + "/"}).result()
    kv.write("key", b"tensorstore").result()
    read = kv.read("key").result()
    assert read.value == b"tensorstore", read
    unchanged = kv.read("key", if_not_equal=read.stamp.generation).result()
    assert unchanged.state == "unspecified", unchanged
    assert kv.list().result() == [b"key"]
    kv.delete_range(ts.KvStore.KeyRange()).result()
    assert kv.list().result() == []
    print("ok")
""")


def test_tensorstore_round_trips(client_env, server, name):
    """In a process of its own: TensorStore reads TENSORSTORE_GCS_HTTP_URL once per process."""
    done = subprocess.run([sys.executable, "-c", TENSORSTORE, name], capture_output=True,
                          text=True, timeout=60, env=os.environ.copy())
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
    reads = [r for r in server.requests if r.method == "GET" and "alt=media" in r.query]
    assert [r.status for r in reads] == [200, 304]  # the conditional read: not modified
