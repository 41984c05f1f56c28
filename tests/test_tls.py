"""TLS on the data plane (Flight over grpc+tls) and the HTTP service, with a CA and
certificates made here: round trips work, plaintext and a wrong CA are refused, and half a
configuration is an error that names the setting."""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
import os
import ssl
import threading
import urllib.error
import urllib.request

import pytest
import torch
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kvstore.cluster.dataplane import DataPlaneClient, DataPlaneServer
from kvstore.config import load_config
from kvstore.errors import ConfigError, TransferError
from kvstore.layout import Layout
from kvstore.service import Service, serve
from kvstore.store import TieredStore
from kvstore.tiers.host import HostTier
from kvstore.tls import TLS

from kvtest_support import shm_name

LAYOUT = Layout("test/tls", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", block_tokens=16)
TOKEN = "tls-" + os.urandom(4).hex()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(tmp_path, tag: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(f"kvstore test CA {tag}")).issuer_name(_name(f"kvstore test CA {tag}"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path = tmp_path / f"ca-{tag}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, str(path)


def make_cert(tmp_path, ca, names=("kvstore",), ips=("127.0.0.1",)):
    ca_key, ca_cert, _ = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    sans = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (x509.CertificateBuilder().subject_name(_name(names[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "node.pem", tmp_path / "node.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


@pytest.fixture
def tls(tmp_path):
    ca = make_ca(tmp_path, "a")
    cert, key = make_cert(tmp_path, ca)
    return TLS.from_config(load_config(None, tls_cert_file=cert, tls_key_file=key, tls_ca_file=ca[2])), tmp_path


@pytest.fixture
def store():
    s = TieredStore([HostTier(shm_name(), LAYOUT.block_nbytes, 8 * LAYOUT.block_nbytes)])
    yield s
    s.close()


def test_flight_over_tls_round_trips_and_refuses_plaintext_and_strangers(tls, store):
    tls, tmp_path = tls
    keys = [os.urandom(16) for _ in range(3)]
    data = torch.randint(0, 255, (3, LAYOUT.block_nbytes), dtype=torch.uint8)
    store.put(LAYOUT, keys, data)
    server = DataPlaneServer(store, "127.0.0.1", 0, TOKEN, 1 << 30, tls=tls).start()
    clients = []

    def pull(client_tls):
        client = DataPlaneClient(server.address, TOKEN, timeout_s=10, tls=client_tls)
        clients.append(client)
        got = {}
        client.get(LAYOUT, keys, lambda k, d, s, offset: got.__setitem__(k, bytes(d)))
        return got

    try:
        got = pull(tls)
        assert [got[k] for k in keys] == [data[i].numpy().tobytes() for i in range(3)]
        with pytest.raises(TransferError):
            pull(None)  # plaintext: the handshake fails, nothing is served
        stranger = TLS.from_config(load_config(None, tls_cert_file=tls.cert_file, tls_key_file=tls.key_file,
                                               tls_ca_file=make_ca(tmp_path, "b")[2]))
        with pytest.raises(TransferError):
            pull(stranger)  # a server whose certificate another CA signed is not trusted
        with pytest.raises(TransferError):
            pull(dataclasses.replace(tls, server_name="someone-else"))  # nor one issued for another name
    finally:
        for c in clients:
            c.close()
        server.shutdown()


def test_the_http_service_over_tls_and_plaintext_refused(tls):
    tls, _ = tls

    class Backend:
        def stats(self):
            return {"nodes": {}}

    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    port = _free_port()
    thread = threading.Thread(target=lambda: loop.run_until_complete(
        serve(Service(Backend(), TOKEN), "127.0.0.1", port, stop, tls.server_context())), daemon=True)
    thread.start()
    try:
        request = urllib.request.Request(f"https://127.0.0.1:{port}/v1/stats",
                                         headers={"Authorization": f"Bearer {TOKEN}"})
        for _ in range(100):
            try:
                with urllib.request.urlopen(request, timeout=10, context=tls.client_context()) as r:
                    assert r.status == 200
                    break
            except urllib.error.URLError as e:
                if not isinstance(e.reason, ConnectionRefusedError):
                    raise
                threading.Event().wait(0.05)
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10)  # plaintext
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", timeout=10,
                                   context=ssl.create_default_context())  # not the cluster's CA
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)
        loop.close()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("settings, message", [
    ({"tls_cert_file": "/nonexistent/node.pem", "tls_key_file": "/nonexistent/node.key"}, "tls_cert_file='/nonexistent/node.pem' cannot be read"),
    ({"tls_cert_file": "x.pem"}, "set both or neither"),
    ({"tls_ca_file": "ca.pem"}, "tls_ca_file is set but"),
])
def test_half_or_unreadable_tls_settings_are_named(settings, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TLS.from_config(load_config(None, **settings))


def test_a_file_that_is_not_pem_is_named(tmp_path):
    bad = tmp_path / "node.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError, match="is not PEM"):
        TLS.from_config(load_config(None, tls_cert_file=str(bad), tls_key_file=str(bad)))
