"""Start the Kong stand-in in-process on 127.0.0.1 port 0 in front of given backend ports."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

from cxr_gateway import kong_model
from cxr_gateway.app import Gateway
from cxr_gateway.local import local_defaults
from cxr_gateway.routes import ProtoCatalog
from tests.support.paths import REPO
from tests.support.servers import TEST_KEY, make_settings

KONG_YML = REPO / "gateway" / "kong.yml"
DESCRIPTOR = REPO / "gateway" / "protos.pb"
UNUSED_PORT = "1"  # services without a backend in a test: nothing listens there
ADMIN_KEY = "test-admin-key-9876543210"  # the cxr-admin consumer's key (acl group `admin`)


def load_kong(ports: dict[str, int], key: str = TEST_KEY, protocol: str = "grpc") -> kong_model.KongConfig:
    env = {"DECK_CXR_API_KEY": key, "DECK_CXR_ADMIN_API_KEY": ADMIN_KEY, "DECK_BACKEND_PROTOCOL": protocol}
    for name in ("classification", "segmentation", "rag", "dicom"):
        env[f"DECK_{name.upper()}_HOST"] = "127.0.0.1"
        env[f"DECK_{name.upper()}_PORT"] = str(ports.get(name, UNUSED_PORT))
    env["DECK_DICOM_STOW_PORT"] = str(ports.get("dicom-stow", UNUSED_PORT))  # the node's STOW-RS (HTTP) port
    return kong_model.load(KONG_YML, env, local_defaults(make_settings()))


def global_plugin(kong: kong_model.KongConfig, name: str):
    return next(p for p in kong.plugins if p.name == name)


@contextlib.asynccontextmanager
async def running_gateway(
    ports: dict[str, int], mutate: Callable[[kong_model.KongConfig], None] | None = None, protocol: str = "grpc"
) -> AsyncIterator[Gateway]:
    kong = load_kong(ports, protocol=protocol)
    if mutate is not None:
        mutate(kong)
    gw = Gateway(kong, ProtoCatalog.load(DESCRIPTOR))
    await gw.start("127.0.0.1", 0, 0, 0)
    try:
        yield gw
    finally:
        await gw.stop()


def self_signed_ca_and_server(dest) -> tuple:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost, written as PEM files under dest."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cxr test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = dest / "ca.pem", dest / "server.pem", dest / "server.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return ca_file, cert_file, key_file
