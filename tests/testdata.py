"""Generated files for tests and benchmarks: odd JPEGs as ImageNet holds them, tiny ILSVRC-2012
tars (and damaged ones), an image folder, JPEGs with an EXIF orientation, and real-size
photo-like JPEGs. No downloads, no PIL."""

from __future__ import annotations

import io
import os
import struct
import tarfile
import tempfile

import numpy as np
import tensorflow as tf

from vgg_jax.data import builtin

# Canonical Huffman table for DC categories 0..11 (JPEG Annex K, luminance DC).
_DC_BITS = (0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0)


def _huffman_codes(bits, values) -> dict[int, tuple[int, int]]:
    codes, code, k = {}, 0, 0
    for length, count in enumerate(bits, start=1):
        for _ in range(count):
            codes[values[k]] = (code, length)
            code, k = code + 1, k + 1
        code <<= 1
    return codes


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def cmyk_jpeg(height: int, width: int, cmyk: tuple[int, int, int, int]) -> bytes:
    """A baseline 4-component (Adobe, inverted CMYK) JPEG of one flat colour.

    TensorFlow cannot encode CMYK, so this writes the few segments by hand: every 8x8 block
    holds only its DC coefficient. Decoded to RGB, R = C * K / 255 (and so on)."""
    dc_codes = _huffman_codes(_DC_BITS, range(12))
    head = b"\xff\xd8" + _segment(0xEE, b"Adobe" + struct.pack(">HHHB", 100, 0, 0, 0))
    head += _segment(0xDB, b"\x00" + bytes([1] * 64))
    components = b"".join(bytes([i + 1, 0x11, 0]) for i in range(4))
    head += _segment(0xC0, struct.pack(">BHHB", 8, height, width, 4) + components)
    head += _segment(0xC4, b"\x00" + bytes(_DC_BITS) + bytes(range(12)))
    head += _segment(0xC4, b"\x10" + bytes([1] + [0] * 15) + b"\x00")  # AC: only EOB, code "0"
    head += _segment(
        0xDA, bytes([4]) + b"".join(bytes([i + 1, 0]) for i in range(4)) + bytes([0, 63, 0])
    )
    bits: list[int] = []

    def put(value: int, length: int) -> None:
        bits.extend((value >> (length - 1 - i)) & 1 for i in range(length))

    previous = [0] * 4
    for _ in range(((height + 7) // 8) * ((width + 7) // 8)):
        for c in range(4):
            dc = 8 * (int(cmyk[c]) - 128)
            diff, previous[c] = dc - previous[c], dc
            category = abs(diff).bit_length()
            put(*dc_codes[category])
            if category:
                put(diff if diff > 0 else diff + (1 << category) - 1, category)
            put(0, 1)  # end of block
    bits.extend([1] * (-len(bits) % 8))
    scan = bytearray()
    for i in range(0, len(bits), 8):
        byte = int("".join(map(str, bits[i : i + 8])), 2)
        scan += bytes([byte, 0]) if byte == 0xFF else bytes([byte])
    return head + bytes(scan) + b"\xff\xd9"


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    return tf.io.encode_jpeg(image, quality=quality).numpy()


def png(image: np.ndarray) -> bytes:
    return tf.io.encode_png(image).numpy()


def truncated(encoded: bytes, keep: float = 0.6) -> bytes:
    return encoded[: int(len(encoded) * keep)]


def odd_images(seed: int = 0) -> dict[str, bytes]:
    """One of each unusual file ImageNet holds, plus one that does not decode at all."""
    image, _ = builtin.draw_example(seed, "train", 0)
    return {
        "cmyk": cmyk_jpeg(40, 56, (255, 40, 0, 255)),
        "png_named_jpeg": png(image),
        "grayscale": jpeg(image[..., :1]),
        "truncated": truncated(jpeg(image)),
        "corrupt": b"\xff\xd8\xff\xe0 this is not image data " * 4,
        "small": jpeg(image[:20, :24]),
    }


# TIFF's integer field types (type number -> struct format: BYTE, SHORT, LONG, SBYTE, SSHORT,
# SLONG), as an IFD entry stores them.
TIFF_INTEGER_TYPES = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i"}


def exif_jpeg(image: np.ndarray, orientation: int, kind: int = 3) -> bytes:
    """A JPEG of ``image`` (as stored, before any turn) carrying an EXIF Orientation tag
    (0x0112), as cameras write it: an APP1 "Exif" segment, big-endian TIFF, one IFD entry of
    TIFF type ``kind`` (3, SHORT, as the EXIF standard says; some writers use others)."""
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8)  # byte order, magic 42, first IFD at 8
    value = struct.pack(">" + TIFF_INTEGER_TYPES[kind], orientation).ljust(4, b"\x00")
    tiff += struct.pack(">H", 1) + struct.pack(">HHI", 0x0112, kind, 1) + value
    tiff += struct.pack(">I", 0)  # no next IFD
    encoded = jpeg(image)
    return encoded[:2] + _segment(0xE1, b"Exif\x00\x00" + tiff) + encoded[2:]


def jpeg_with_thumbnail(image: np.ndarray) -> bytes:
    """A JPEG of ``image`` whose APP1 "Exif" segment holds a thumbnail JPEG, as cameras write
    it: the thumbnail's own start-of-scan and end-of-image markers come before the image's."""
    thumbnail = jpeg(image[::4, ::4])
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 0) + struct.pack(">I", 0)
    encoded = jpeg(image)
    return encoded[:2] + _segment(0xE1, b"Exif\x00\x00" + tiff + thumbnail) + encoded[2:]


def damage_tar_middle(path: str, length: int = 512) -> int:
    """Overwrites ``length`` bytes from the header of the member nearest the middle of the tar
    at ``path`` (random bytes, as a bad disk block would): Python's tarfile then stops there
    without an error, so the tar reads as a shorter one. Returns the damaged offset."""
    with tarfile.open(path) as tar:
        offsets = [member.offset for member in tar.getmembers()]
    middle = os.path.getsize(path) // 2
    offset = min(offsets[1:], key=lambda o: abs(o - middle))
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.random.default_rng(0).integers(1, 256, length, dtype=np.uint8).tobytes())
    return offset


def cut_synset_tar(path: str, synset_tar: str, keep: int) -> None:
    """Rewrites the ILSVRC-2012 train tar at ``path`` with its member ``synset_tar`` cut to its
    first ``keep`` bytes, as when a synset tar copied short was packed: the train tar itself is
    whole, the synset tar inside it is not."""
    with tarfile.open(path) as tar:
        members = [(member, tar.extractfile(member).read()) for member in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for member, payload in members:
            if member.name == synset_tar:
                payload = payload[:keep]
                member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))


def damage_synset_tar_middle(path: str, synset_tar: str) -> None:
    """Rewrites the ILSVRC-2012 train tar at ``path`` with a bad header in the middle of its
    member ``synset_tar`` (``damage_tar_middle``), as when a synset tar read from a bad disk
    was packed: the train tar is whole, and the synset tar still ends as a tar ends, so only
    reading it shows fewer images."""
    with tarfile.open(path) as tar:
        members = [(member, tar.extractfile(member).read()) for member in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for member, payload in members:
            if member.name == synset_tar:
                with tempfile.NamedTemporaryFile(suffix=".tar") as f:
                    f.write(payload)
                    f.flush()
                    damage_tar_middle(f.name)
                    f.seek(0)
                    payload = f.read()
            tar.addfile(member, io.BytesIO(payload))


def truncate_file(path: str, keep: float = 0.6) -> None:
    """Cuts the file at ``path`` to its first ``keep`` fraction (an interrupted copy)."""
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep))


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_ilsvrc_tars(
    manual_dir: str, synsets: list[str], per_class: int, num_val: int, seed: int = 0
) -> dict[str, str]:
    """``ILSVRC2012_img_train.tar`` (one ``<synset>.tar`` per class) and
    ``ILSVRC2012_img_val.tar`` (``ILSVRC2012_val_000000NN.JPEG``) with generated images; the
    first training images are the odd ones of ``odd_images``. Returns {kind: file name} of those."""
    os.makedirs(manual_dir, exist_ok=True)
    odd = list(odd_images(seed).items())
    placed = {}
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as outer:
        for c, synset in enumerate(synsets):
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for i in range(per_class):
                    name = f"{synset}_{i}.JPEG"
                    k = c * per_class + i
                    if k < len(odd):
                        placed[odd[k][0]] = name
                        payload = odd[k][1]
                    else:
                        payload = jpeg(builtin.draw_example(seed, "train", k)[0])
                    _add(inner, name, payload)
            _add(outer, f"{synset}.tar", inner_bytes.getvalue())
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as val:
        for i in range(num_val):
            image, _ = builtin.draw_example(seed, "validation", i)
            _add(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", jpeg(image))
    return placed


def write_image_folder(root: str, splits: dict[str, int], classes: list[str], seed: int = 0):
    """``root/<split>/<class>/<n>.jpg`` with ``splits[split]`` images per class."""
    for split, count in splits.items():
        for c, name in enumerate(classes):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(count):
                image, _ = builtin.draw_example(seed, "train", 1000 * c + i)
                with open(os.path.join(root, split, name, f"{i}.jpg"), "wb") as f:
                    f.write(jpeg(image))


def photo_like_jpeg(seed: int, height: int = 375, width: int = 500, quality: int = 95) -> bytes:
    """A JPEG the size of a typical ImageNet photo (about 500x375, ~110 KB): smooth colour
    regions, edges and fine texture, so its entropy-coded data is as dense as a photo's."""
    rng = np.random.default_rng(seed)
    image, _ = builtin.draw_example(seed, "train", 0)
    base = tf.image.resize(image[None].astype(np.float32), (height, width), "bilinear")[0]
    texture = rng.normal(0.0, 1.0, size=(height // 2, width // 2, 3)).astype(np.float32)
    texture = tf.image.resize(texture[None], (height, width), "bilinear")[0]
    photo = base.numpy() + 14.0 * texture.numpy() + rng.normal(0.0, 6.0, size=(height, width, 3))
    return jpeg(np.clip(photo, 0, 255).astype(np.uint8), quality)
