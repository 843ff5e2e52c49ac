"""TLS and mutual TLS between cxr_client and the runtime, with certificates made in the test."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cxr_client import AsyncCxrClient, ClientConfig, TlsOptions, UnavailableError
from tests.support.servers import TEST_KEY, make_settings, running_server
from tests.support.toy_service import build_toy


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, cert, key) -> tuple[Path, Path]:
    crt, pem = path.with_suffix(".crt"), path.with_suffix(".key")
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return crt, pem


def _issue(cn: str, ca_cert, ca_key, *, server: bool):
    key = _key()
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(ca_key, hashes.SHA256()), key


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    now = dt.datetime.now(dt.UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("cxr test CA"))
        .issuer_name(_name("cxr test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_crt, _ = _write(d / "ca", ca, ca_key)
    srv_crt, srv_key = _write(d / "server", *_issue("localhost", ca, ca_key, server=True))
    cli_crt, cli_key = _write(d / "client", *_issue("cxr-client", ca, ca_key, server=False))
    other_key = _key()
    other_ca = (
        x509.CertificateBuilder()
        .subject_name(_name("other CA"))
        .issuer_name(_name("other CA"))
        .public_key(other_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(other_key, hashes.SHA256())
    )
    other_crt, _ = _write(d / "other", other_ca, other_key)
    return {"ca": ca_crt, "server_crt": srv_crt, "server_key": srv_key, "client_crt": cli_crt,
            "client_key": cli_key, "other_ca": other_crt}  # fmt: skip


def _tls_settings(pki, mutual: bool):
    tls = {"enabled": True, "cert_file": str(pki["server_crt"]), "key_file": str(pki["server_key"])}
    if mutual:
        tls["client_ca_file"] = str(pki["ca"])
    return make_settings(**{"security__tls": tls})


async def test_tls_with_root_certs(pki, sample_png):
    s = _tls_settings(pki, mutual=False)
    async with running_server(s, build_toy(s)) as server:
        cfg = ClientConfig(
            endpoint=f"grpcs://localhost:{server.port}", api_key=TEST_KEY, tls=TlsOptions(root_certs_file=pki["ca"])
        )
        async with AsyncCxrClient(cfg) as client:
            assert (await client.classify(sample_png)).predictions
        # a client that trusts another CA cannot connect
        bad = cfg.model_copy(update={"tls": TlsOptions(root_certs_file=pki["other_ca"]), "timeout_s": 3})
        async with AsyncCxrClient(bad) as client:
            with pytest.raises(UnavailableError):
                await client.classify(sample_png)


async def test_mutual_tls_needs_the_client_certificate(pki, sample_png):
    s = _tls_settings(pki, mutual=True)
    async with running_server(s, build_toy(s)) as server:
        env = {
            "CXR_ENDPOINT": f"127.0.0.1:{server.port}",
            "CXR_API_KEY": TEST_KEY,
            "CXR_TLS_ROOT_CERTS": str(pki["ca"]),
            "CXR_TLS_CLIENT_CERT": str(pki["client_crt"]),
            "CXR_TLS_CLIENT_KEY": str(pki["client_key"]),
        }
        cfg = ClientConfig.from_env(env)
        assert cfg.tls.enabled
        async with AsyncCxrClient(cfg) as client:
            assert (await client.classify(sample_png)).predictions
        no_cert = cfg.model_copy(update={"tls": TlsOptions(enabled=True, root_certs_file=pki["ca"]), "timeout_s": 3})
        async with AsyncCxrClient(no_cert) as client:
            with pytest.raises(UnavailableError):
                await client.classify(sample_png)
