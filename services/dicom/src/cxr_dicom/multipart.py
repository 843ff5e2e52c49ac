"""An incremental multipart/related parser (RFC 2046 / RFC 2387) for STOW-RS, fed the body chunk by chunk so a
request never has to be held in memory whole."""

from __future__ import annotations

import re
from dataclasses import dataclass

_BOUNDARY = re.compile(r'boundary=(?:"([^"]+)"|([^";\s]+))', re.IGNORECASE)
_TYPE = re.compile(r'type=(?:"([^"]+)"|([^";\s]+))', re.IGNORECASE)
_MAX_HEADERS = 16 * 1024  # a part's header block larger than this is not a STOW part
_MAX_PADDING = 1024  # transport padding allowed after a boundary, before its CRLF


class UnsupportedMediaType(ValueError):
    """The request is not multipart/related at all (HTTP 415), as opposed to a malformed one (400)."""


@dataclass(frozen=True)
class PartStart:
    content_type: str


@dataclass(frozen=True)
class PartData:
    data: bytes


@dataclass(frozen=True)
class PartEnd:
    pass


Event = PartStart | PartData | PartEnd

_PREAMBLE, _HEADERS, _BODY, _EPILOGUE = range(4)
_NOT_A_DELIMITER = (False, -1)


class MultipartRelatedParser:
    """``feed`` chunks, then ``close``; both return `PartStart`/`PartData`/`PartEnd` events in order.

    The delimiter is CRLF "--" boundary (the first may start the body): RFC 2046 guarantees only that sequence is
    absent from a part, so a part may contain "--boundary" anywhere else. ValueError for a malformed body."""

    def __init__(self, content_type: str) -> None:
        media = content_type.split(";", 1)[0].strip().lower()
        if media != "multipart/related":
            raise UnsupportedMediaType("the body must be multipart/related with a boundary")
        match = _BOUNDARY.search(content_type)
        if match is None:
            raise ValueError("the multipart/related Content-Type has no boundary")
        boundary = (match.group(1) or match.group(2)).encode("latin-1")
        if not 1 <= len(boundary) <= 70:
            raise ValueError("the multipart boundary must be 1 to 70 characters")
        root = _TYPE.search(content_type)
        self.default_type = (root.group(1) or root.group(2)).strip().lower() if root else "application/dicom"
        self._delimiter = b"\r\n--" + boundary
        self._buf = bytearray(b"\r\n")  # so a delimiter at the very start of the body is found like any other
        self._state = _PREAMBLE
        self.parts = 0

    def feed(self, chunk: bytes) -> list[Event]:
        """Events for everything decidable so far; at most a delimiter's length plus padding stays buffered."""
        self._buf += chunk
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def close(self) -> list[Event]:
        """The remaining events; ValueError when the body ended before its closing delimiter or had no part."""
        events = self.feed(b"")
        if self._state != _EPILOGUE:
            raise ValueError("the multipart body ended before its closing boundary")
        if self.parts == 0:
            raise ValueError("the multipart body has no part")
        return events

    def _step(self, events: list[Event]) -> bool:
        """One transition; False when more input is needed."""
        buf, delim = self._buf, self._delimiter
        if self._state == _EPILOGUE:
            buf.clear()
            return False
        if self._state in (_PREAMBLE, _BODY):
            at = buf.find(delim)
            if at < 0:
                keep = len(delim) - 1  # a delimiter may straddle this chunk and the next
                if self._state == _BODY and len(buf) > keep:
                    events.append(PartData(bytes(buf[: len(buf) - keep])))
                if len(buf) > keep:
                    del buf[: len(buf) - keep]
                return False
            verdict = self._boundary_line(at + len(delim))
            if verdict is None:  # the bytes after the delimiter are not here yet
                if self._state == _BODY and at > 0:
                    events.append(PartData(bytes(buf[:at])))
                del buf[:at]
                return False
            closing, line_end = verdict
            if line_end < 0:  # "--boundary" followed by other text: part content, not a delimiter
                if self._state == _BODY:
                    events.append(PartData(bytes(buf[: at + 1])))
                del buf[: at + 1]
                return True
            if self._state == _BODY:
                if at > 0:
                    events.append(PartData(bytes(buf[:at])))
                events.append(PartEnd())
            del buf[:line_end]
            self._state = _EPILOGUE if closing else _HEADERS
            return True
        # _HEADERS: the boundary line's CRLF is consumed, so an empty header block is a bare CRLF
        if buf.startswith(b"\r\n"):
            head, rest = b"", 2
        else:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEADERS:
                    raise ValueError("a multipart part's headers are too long")
                return False
            head, rest = bytes(buf[:end]), end + 4
        part_type = self.default_type
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-type":
                part_type = value.split(";", 1)[0].strip().lower()
        del buf[:rest]
        self._state = _BODY  # the part's content starts here and ends at the CRLF of the next delimiter
        self.parts += 1
        events.append(PartStart(part_type))
        return True

    def _boundary_line(self, start: int) -> tuple[bool, int] | None:
        """After "CRLF--boundary" ending at ``start``: (closing, end of the boundary line), with end -1 when it is
        not a delimiter (other text follows), or None when more bytes are needed."""
        buf = self._buf
        if len(buf) < start + 2:
            return None
        if buf[start : start + 2] == b"--":
            return True, start + 2
        line_end = buf.find(b"\r\n", start)
        if line_end < 0:
            tail = buf[start:].removesuffix(b"\r")  # its LF may be in the next chunk
            if tail.strip(b" \t"):
                return _NOT_A_DELIMITER
            if len(tail) > _MAX_PADDING:
                raise ValueError("too much padding after a multipart boundary")
            return None
        if buf[start:line_end].strip(b" \t"):
            return _NOT_A_DELIMITER
        return False, line_end + 2
