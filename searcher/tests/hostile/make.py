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


def hostile_round_two(jpeg):
    """The findings of the second hostile run (issue 18): cost amplification, a cut scan
    with an end marker glued on, formats to name rather than call "not an image"."""
    # 35 bytes: a 6000 × 6000 logical screen around a 1 × 1 frame.
    write("gif-screen-6000x6000.gif", b"GIF89a" + struct.pack("<HHBBB", 6000, 6000, 0, 0, 0)
          + b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00\x3b" + b"\x00" * 6)
    # A small JPEG whose frame header declares 16384 × 2441 (under the pixel limit).
    sof = jpeg.index(b"\xff\xc0")
    write("jpeg-declares-16384x2441.jpg", jpeg[: sof + 5] + struct.pack(">HH", 2441, 16384) + jpeg[sof + 9:])
    write("truncated-with-eoi.jpg", jpeg[: len(jpeg) * 2 // 3] + b"\xff\xd9")
    write("bigtiff.tif", b"II+\x00\x08\x00\x00\x00\x10\x00\x00\x00\x00\x00\x00\x00" + b"\x00" * 32)
    # An extended WebP whose canvas is 20000 × 20000 (over the 16384-pixel side limit).
    vp8x = b"\x10\x00\x00\x00" + (19999).to_bytes(3, "little") + (19999).to_bytes(3, "little")
    write("webp-canvas-20000x20000.webp", b"RIFF" + struct.pack("<I", 4 + 8 + len(vp8x)) + b"WEBPVP8X" + struct.pack("<I", len(vp8x)) + vp8x)


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
hostile_round_two(jpeg)
print("corpus written to", HERE)
