"""cxr_dicom.multipart: the STOW-RS multipart/related parser, whole and fed in small chunks, on RFC 2046 shapes."""

from __future__ import annotations

import pytest

from cxr_dicom.intakes import parse_multipart_related
from cxr_dicom.multipart import MultipartRelatedParser, PartData, PartStart, UnsupportedMediaType
from tests.support.paths import dicom_files

CT_B = 'multipart/related; type="application/dicom"; boundary=b'


def fed(body: bytes, content_type: str, size: int) -> list[tuple[str, bytes]]:
    """The parts as the incremental parser sees them when the body arrives ``size`` bytes at a time."""
    parser = MultipartRelatedParser(content_type)
    events = []
    for at in range(0, len(body), size):
        events += parser.feed(body[at : at + size])
    events += parser.close()
    parts: list[tuple[str, bytes]] = []
    for event in events:
        if isinstance(event, PartStart):
            parts.append((event.content_type, b""))
        elif isinstance(event, PartData):
            parts[-1] = (parts[-1][0], parts[-1][1] + event.data)
    return parts


def every_way(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    whole = list(parse_multipart_related(body, content_type))
    for size in (1, 2, 3, 7, 64):
        assert fed(body, content_type, size) == whole, size
    return whole


def test_a_short_boundary_inside_a_part_is_content_not_a_delimiter():
    payloads = [b"A--bB", b"--b at the start", b"x\n--b\n--b--y", b"ends with --b", b"\r--b\r\n", b"-", b""]
    body = b"".join(b"--b\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in payloads) + b"--b--\r\n"
    assert every_way(body, CT_B) == [("application/dicom", p) for p in payloads]


def test_rfc2046_shapes_preamble_padding_epilogue_default_type_and_quoted_boundary():
    ct = 'Multipart/Related; boundary="a b:c"; type="application/dicom"'
    body = (
        b"a preamble with --a b:c inside\r\n"
        b"--a b:c \t\r\n"  # transport padding after the boundary
        b"Content-Type: application/octet-stream; x=1\r\nContent-Location: 1\r\n\r\n"
        b"one\r\n"
        b"--a b:c\r\n"
        b"\r\n"  # no headers: the root type
        b"two\r\n\r\n"
        b"--a b:c--  \r\nan epilogue\r\n--a b:c\r\nignored\r\n"
    )
    assert every_way(body, ct) == [("application/octet-stream", b"one"), ("application/dicom", b"two\r\n")]
    # no preamble, no type parameter, a closing delimiter without CRLF
    assert every_way(b"--b\r\n\r\nx\r\n--b--", "multipart/related; boundary=b") == [("application/dicom", b"x")]


def test_malformed_bodies_and_wrong_media_types_are_told_apart():
    for body in (b"", b"--b--\r\n", b"no delimiter at all", b"--b\r\nContent-Type: application/dicom\r\n\r\ncut"):
        with pytest.raises(ValueError) as err:
            list(parse_multipart_related(body, CT_B))
        assert not isinstance(err.value, UnsupportedMediaType), body
    with pytest.raises(UnsupportedMediaType):
        MultipartRelatedParser("application/dicom")
    with pytest.raises(ValueError) as err:
        MultipartRelatedParser("multipart/related; type=application/dicom")
    assert not isinstance(err.value, UnsupportedMediaType)


def test_every_shared_dicom_in_one_body_in_64k_chunks_is_byte_identical():
    files = [p.read_bytes() for p in dicom_files()]
    assert len(files) >= 6
    boundary = b"cxr-8c1f"
    body = b"".join(b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n" + f + b"\r\n" for f in files)
    body += b"--" + boundary + b"--\r\n"
    ct = "multipart/related; boundary=cxr-8c1f"
    assert fed(body, ct, 64 * 1024) == [("application/dicom", f) for f in files]
    assert list(parse_multipart_related(body, ct)) == [("application/dicom", f) for f in files]
