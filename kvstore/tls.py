"""TLS for the data plane (Flight over `grpc+tls`) and the HTTP service.

TLS is on when `tls_cert_file` and `tls_key_file` name a certificate chain and its key (PEM; in
the chart, mounted from a Secret). Every node serves with them, and every client checks a peer's
certificate against `tls_ca_file` (empty: the system's roots) under the name
`tls_server_name`, not the peer's address: nodes are reached by pod IPs that no certificate can
list ahead of time, so a cluster's certificates are issued for one name. With TLS on, a server
speaks nothing else: a plaintext client cannot connect.
"""
from __future__ import annotations

import dataclasses
import ssl
from pathlib import Path

from kvstore.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class TLS:
    cert_chain: bytes  # PEM: this side's certificate, then its intermediates
    private_key: bytes  # PEM
    ca: bytes | None  # PEM roots a peer's certificate must chain to; None: the system's
    server_name: str
    cert_file: str
    key_file: str
    ca_file: str

    @classmethod
    def from_config(cls, config) -> "TLS | None":
        """The node's TLS material, or None when TLS is off; ConfigError naming a file that is
        missing or unreadable, or a half-configured pair."""
        if not config.tls_cert_file and not config.tls_key_file:
            if config.tls_ca_file:
                raise ConfigError("tls_ca_file is set but tls_cert_file and tls_key_file are not: set all three "
                                  "(every node serves TLS with its own certificate)")
            return None
        if not (config.tls_cert_file and config.tls_key_file):
            raise ConfigError(f"tls_cert_file={config.tls_cert_file!r} and tls_key_file={config.tls_key_file!r}: "
                              "set both or neither")
        return cls(_read("tls_cert_file", config.tls_cert_file), _read("tls_key_file", config.tls_key_file),
                   _read("tls_ca_file", config.tls_ca_file) if config.tls_ca_file else None,
                   config.tls_server_name, config.tls_cert_file, config.tls_key_file, config.tls_ca_file)

    def server_context(self) -> ssl.SSLContext:
        """For the HTTP service."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"tls_cert_file={self.cert_file!r} with tls_key_file={self.key_file!r}: {e}") from None
        return context

    def client_context(self) -> ssl.SSLContext:
        """For a client of the HTTP service (`kvstore status`): checks the server's certificate
        against the CA and the URL's host name (give the certificate the service's names too)."""
        context = ssl.create_default_context(cafile=self.ca_file or None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context


def _read(setting: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{setting}={path!r} cannot be read: {e.strerror}") from None
    if b"-----BEGIN" not in data:
        raise ConfigError(f"{setting}={path!r} is not PEM (no '-----BEGIN' line)")
    return data
