"""What the project reads from an image file's bytes without decoding it: whether it is a JPEG
or a PNG by its signature (names lie), and a JPEG's header segments (EXIF orientation, where its
compressed data starts). Pure Python: used while files are copied and probed."""

from __future__ import annotations

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"  # start-of-image, then the first marker's FF
START_OF_SCAN = 0xDA


def is_jpeg_or_png(encoded: bytes) -> bool:
    """Whether the bytes are what the pipeline decodes, by their first bytes as
    ``transforms.image_format`` reads them."""
    return encoded.startswith(JPEG_SIGNATURE) or encoded.startswith(PNG_SIGNATURE)


def jpeg_header_segments(encoded: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """``([(marker, payload), ...], scan)``: a JPEG's marker segments before its first scan, each
    skipped by its length (so an EXIF thumbnail, a whole JPEG inside an APP1 segment, is never
    read as the image's own markers), and the position where the walk stopped: the start-of-scan
    marker, or where the header stops making sense (a file cut short)."""
    position, size, segments = 2, len(encoded), []  # after the start-of-image marker
    while position + 4 <= size and encoded[position] == 0xFF:
        marker = encoded[position + 1]
        if marker == 0xFF:  # a fill byte before a marker
            position += 1
            continue
        if marker == START_OF_SCAN:
            break
        length = int.from_bytes(encoded[position + 2 : position + 4], "big")
        segments.append((marker, encoded[position + 4 : position + 2 + length]))
        position += 2 + length
    return segments, position
