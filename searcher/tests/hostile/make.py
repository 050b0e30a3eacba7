"""Writes the hostile-input corpus of searcher/tests/hostile.rs (committed; rerun to
regenerate). Photos come from the CC0 demo catalog.

    python3 searcher/tests/hostile/make.py
"""
import io
import os
import random
import struct
import zlib

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = os.path.join(HERE, "..", "..", "..", "demo", "catalog", "images")


def write(name, data):
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(data)


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


photo = Image.open(os.path.join(DEMO, sorted(os.listdir(DEMO))[0])).convert("RGB")
small = photo.resize((64, 80))
buf = io.BytesIO(); small.save(buf, "JPEG", quality=85); jpeg = buf.getvalue()
buf = io.BytesIO(); small.save(buf, "PNG"); png = buf.getvalue()

write("zero.bin", b"")
random.seed(7)
write("random.bin", bytes(random.getrandbits(8) for _ in range(2048)))
write("truncated.jpg", jpeg[: len(jpeg) // 2])
write("truncated.png", png[: len(png) // 2])
# A PNG that declares 100000 × 100000 pixels in a few bytes: a decompression bomb.
ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
write("bomb-100000x100000.png", b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b""))
for fmt, name in [("GIF", "small.gif"), ("WEBP", "small.webp"), ("TIFF", "small.tiff")]:
    buf = io.BytesIO(); small.save(buf, fmt); write(name, buf.getvalue())
# HEIC: the ISO-BMFF brand box only (no decoder exists here; it must be refused cleanly).
write("fake.heic", struct.pack(">I", 24) + b"ftypheic" + b"\x00\x00\x00\x00" + b"mif1heic" + b"\x00" * 64)
# EXIF orientation 6 (rotate 90° clockwise): 64 × 80 stored, 80 × 64 upright.
exif = Image.Exif(); exif[0x0112] = 6
buf = io.BytesIO(); small.save(buf, "JPEG", quality=85, exif=exif.tobytes()); write("exif-rotated.jpg", buf.getvalue())
write("photo.jpg", jpeg)
print("corpus written to", HERE)
