"""The HTTP service's input handling, on a real aiohttp server on loopback (no Ray: the answers
come from a small in-process backend; tests/cluster/test_cluster.py runs it on a cluster).
Found by fuzzing: malformed requests must get a 4xx with a message, never a 500."""
from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading

import pytest
from aiohttp import web

from kvstore.service import Service

TOKEN = "service-test-token"


HELD = bytes.fromhex("ab" * 16)  # the one key the backend holds, on node "n1"


class Backend:
    def stats(self) -> dict:
        return {"index_keys": 0, "nodes_registered": 0, "nodes": {}}

    def nodes(self) -> list:
        return [{"node_id": "n1", "address": "10.0.0.1:8471", "tls": False, "pid": 7, "shm_name": "kvstore-x"},
                {"node_id": "n2", "address": "10.0.0.2:8471", "tls": False, "pid": 8, "shm_name": "kvstore-y"}]

    def where(self, keys):
        return [[("n1", "host")] if k == HELD else [] for k in keys]

    def best_node(self, keys):
        return {"node_id": None, "prefix_blocks": 0, "per_node": {}}

    reported: list = []

    def report_residency(self, engine_id, stored, removed, cleared, node_id):
        self.reported.append((engine_id, stored, removed, cleared, node_id))
        return {"known_node": node_id in ("n1", "n2"), "resend": engine_id == "lost-by-a-shard"}


@pytest.fixture(scope="module")
def address():
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(Service(Backend(), TOKEN).app())
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield "127.0.0.1", port
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.run_until_complete(runner.cleanup())
    loop.close()


def raw(address, request: bytes) -> tuple[int, bytes]:
    """Sends bytes as they are (no client library cleans them up); returns (status, body)."""
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def post(address, body: bytes, auth: bytes = b"Bearer " + TOKEN.encode(), path: bytes = b"/v1/lookup") -> tuple[int, bytes]:
    return raw(address, b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: " + auth +
               b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


@pytest.mark.parametrize("auth", [b"Bearer \xff\xfe\x80", b"\xc3\x28", b"Bearer " + TOKEN.encode() + b"\xff"])
def test_a_non_utf8_authorization_header_is_a_401_with_a_message(address, auth):
    status, body = raw(address, b"GET /v1/stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: " + auth +
                       b"\r\n\r\n")
    assert status == 401 and b"token" in body


@pytest.mark.parametrize("body", [b"[" * 1000 + b"]" * 1000, b'{"keys": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                                  b"\xff\xfe not json", b'{"keys": ["zz"]}'])
def test_malformed_lookups_are_a_400_with_a_message_and_the_service_goes_on(address, body):
    status, reply = post(address, body)
    assert status == 400 and json.loads(reply)["error"]
    status, reply = post(address, b'{"keys": []}')
    assert status == 200 and json.loads(reply)["blocks"] == 0


def get(address, path: bytes, auth: bytes | None) -> tuple[int, bytes]:
    return raw(address, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" +
               (b"Authorization: " + auth + b"\r\n" if auth is not None else b"") + b"\r\n")


def test_the_status_page_takes_basic_auth_and_no_token_in_its_url(address):
    status, _ = get(address, b"/", None)
    assert status == 401  # and it asks the browser for the password:
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert b'WWW-Authenticate: Basic realm="kvstore"' in s.recv(65536)
    assert get(address, b"/", b"Basic " + base64.b64encode(b"anyone:" + TOKEN.encode()))[0] == 200
    assert get(address, b"/", b"Basic " + base64.b64encode(b"anyone:wrong"))[0] == 401
    assert get(address, b"/", b"Basic !!not-base64")[0] == 401
    assert get(address, b"/?token=" + TOKEN.encode(), None)[0] == 401


def test_lookups_name_the_holders_data_plane_addresses_and_may_skip_the_best_node(address):
    status, reply = post(address, json.dumps({"keys": [HELD.hex(), "cd" * 16]}).encode())
    answer = json.loads(reply)
    assert status == 200 and answer["addresses"] == {"n1": "10.0.0.1:8471"}  # the holder's only
    assert answer["best_node"] == {"node_id": None, "prefix_blocks": 0, "per_node": {}}
    status, reply = post(address, json.dumps({"keys": [HELD.hex()], "best_node": False}).encode())
    assert status == 200 and json.loads(reply)["best_node"] is None
    status, reply = post(address, json.dumps({"keys": [], "best_node": "no"}).encode())
    assert status == 400 and "best_node='no'" in json.loads(reply)["error"]


def test_the_data_plane_list_has_addresses_and_nothing_else_of_the_nodes(address):
    status, reply = get(address, b"/v1/dataplane", b"Bearer " + TOKEN.encode())
    assert status == 200 and json.loads(reply) == {"nodes": [
        {"node_id": "n1", "address": "10.0.0.1:8471", "tls": False},
        {"node_id": "n2", "address": "10.0.0.2:8471", "tls": False}]}
    assert get(address, b"/v1/dataplane", None)[0] == 401


@pytest.mark.parametrize("body, named", [
    ({"node_id": "n1"}, "engine_id=None"),
    ({"engine_id": "x" * 200, "node_id": "n1"}, "engine_id="),
    ({"engine_id": "e", "node_id": 5}, "node_id=5"),
    ({"engine_id": "e", "node_id": "n1", "cleared": "yes"}, "cleared='yes'"),
    ({"engine_id": "e", "node_id": "n1", "stored": ["zz"]}, "stored[0]='zz'"),
    ({"engine_id": "e", "node_id": "n1", "removed": "ab" * 16}, "removed must be a list"),
])
def test_bad_residency_reports_are_a_400_naming_the_value(address, body, named):
    status, reply = post(address, json.dumps(body).encode(), path=b"/v1/residency")
    assert status == 400 and named in json.loads(reply)["error"]


def test_a_residency_report_reaches_the_backend_and_says_whether_the_node_is_known(address):
    Backend.reported.clear()
    body = {"engine_id": "e1", "node_id": "n2", "stored": [HELD.hex()], "removed": [], "cleared": True}
    status, reply = post(address, json.dumps(body).encode(), path=b"/v1/residency")
    assert status == 200 and json.loads(reply) == {"known_node": True, "resend": False}
    assert Backend.reported == [("e1", [HELD], [], True, "n2")]
    status, reply = post(address, json.dumps({**body, "node_id": "elsewhere"}).encode(), path=b"/v1/residency")
    assert status == 200 and json.loads(reply) == {"known_node": False, "resend": False}
    status, reply = post(address, json.dumps({**body, "engine_id": "lost-by-a-shard"}).encode(), path=b"/v1/residency")
    assert status == 200 and json.loads(reply) == {"known_node": True, "resend": True}
