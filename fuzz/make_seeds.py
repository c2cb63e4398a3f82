#!/usr/bin/env python3
"""Writes the fuzzer's committed seed corpus (fuzz/corpus/): small valid images of every kind the
decoders take, decompression bombs crafted by hand, prompts, and requests carrying those images.

Run from the repository root with the project's venv (Pillow is in it, see scripts/setup.sh):

    .venv/bin/python fuzz/make_seeds.py

The files are committed; CI never runs this. Request and cancel seeds also come straight from
schemas/examples/ (see fuzz/targets.rs), so only what those lack is written here.
"""

import base64
import io
import json
import struct
import zlib
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent
CORPUS = ROOT / "corpus"


def picture(mode, size=(48, 32)):
    """A small test picture with gradients and an edge, so encoders have something to encode."""
    w, h = size
    rgba = Image.new("RGBA", size)
    rgba.putdata(
        [((x * 255) // max(w - 1, 1), (y * 255) // max(h - 1, 1), (x ^ y) * 9 % 256, 255 if x < w // 2 else (y * 20) % 256)
         for y in range(h) for x in range(w)]
    )
    if mode == "RGBA":
        return rgba
    return rgba.convert(mode)


def save(target, name, data):
    path = CORPUS / target / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def encode(img, fmt, **options):
    out = io.BytesIO()
    img.save(out, fmt, **options)
    return out.getvalue()


def exif_orientation(value):
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


# --- PNG -------------------------------------------------------------------------------------------

def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_raw(width, height, bit_depth, color_type, rows, interlace=0, extra=b"", level=9):
    """A PNG written by hand: IHDR, extra chunks, one IDAT of `rows` (already filtered), IEND."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra
            + chunk(b"IDAT", zlib.compress(rows, level)) + chunk(b"IEND", b""))


def adam7_rows(width, height, bytes_per_pixel):
    """Filtered scanlines of an interlaced 8-bit image (filter type cycling through 0..4)."""
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    out = bytearray()
    for x0, y0, dx, dy in passes:
        pw = (width - x0 + dx - 1) // dx if width > x0 else 0
        ph = (height - y0 + dy - 1) // dy if height > y0 else 0
        if pw == 0 or ph == 0:
            continue
        for row in range(ph):
            out.append(row % 5)
            out.extend(((row * 31 + i * 7) & 0xFF) for i in range(pw * bytes_per_pixel))
    return bytes(out)


def pngs():
    names = {"1": "bilevel", "L": "grey", "LA": "grey-alpha", "P": "palette", "RGB": "rgb", "RGBA": "rgba",
             "I;16": "grey16"}
    for mode, name in names.items():
        save("decode_png", f"{name}.png", encode(picture(mode), "PNG"))
    for bits in [1, 2, 4]:
        save("decode_png", f"palette-{bits}bit.png", encode(picture("P").quantize(2 ** bits), "PNG", bits=bits))
    palette = picture("P")
    save("decode_png", "palette-trns.png", encode(palette, "PNG", transparency=3))
    save("decode_png", "rgb-trns.png", encode(picture("RGB"), "PNG", transparency=(0, 0, 0)))
    save("decode_png", "tiny-1x1.png", encode(picture("RGB", (1, 1)), "PNG"))
    save("decode_png", "exif-rotate90.png", encode(picture("RGB"), "PNG", exif=exif_orientation(6)))
    save("decode_png", "icc.png", encode(picture("RGB"), "PNG", icc_profile=b"\0" * 128))
    frames = [picture("RGBA"), picture("RGBA").rotate(180)]
    save("decode_png", "apng.png", encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100))
    # 16-bit RGB(A) and 2-bit grey, and an interlaced one: Pillow writes none of these.
    rows16 = b"".join(b"\0" + bytes((x * 37 + y) & 0xFF for x in range(6 * 9)) for y in range(7))
    save("decode_png", "rgb16.png", png_raw(9, 7, 16, 2, rows16))
    rows16a = b"".join(b"\1" + bytes((x * 13 + y) & 0xFF for x in range(8 * 9)) for y in range(7))
    save("decode_png", "rgba16.png", png_raw(9, 7, 16, 6, rows16a))
    save("decode_png", "grey-2bit.png", png_raw(13, 5, 2, 0, b"".join(b"\2\x1b\xe4\x39\x00" for _ in range(5))))
    save("decode_png", "interlaced-rgb.png", png_raw(11, 10, 8, 2, adam7_rows(11, 10, 3), interlace=1))
    save("decode_png", "stored-deflate.png", png_raw(8, 8, 8, 0, b"".join(b"\3" + bytes(range(y, y + 8)) for y in range(8)), level=0))

    # Bombs: the header says more than the limits allow; the rest is tiny.
    tiny_idat = b"\0\0\0\0"
    save("decode_png", "bomb-60000x60000.png", png_raw(60000, 60000, 8, 2, tiny_idat))
    save("decode_png", "bomb-16bit-rgba-20000x20000.png", png_raw(20000, 20000, 16, 6, tiny_idat))
    save("decode_png", "bomb-8192x8192.png", png_raw(8192, 8192, 8, 0, tiny_idat))
    save("decode_png", "bomb-1x2147483647.png", png_raw(1, 0x7FFFFFFF, 8, 0, tiny_idat))
    # A well-formed 48x32 image whose colour profile inflates to 64 MiB: the limits are on pixels, so
    # nothing may inflate metadata past them either. And the same with a compressed text chunk.
    bomb = zlib.compress(b"\0" * (64 << 20), 9)
    iccp = chunk(b"iCCP", b"bomb\0\0" + bomb)
    rows = b"".join(b"\0" + bytes(48) for _ in range(32))
    save("decode_png", "inflate-bomb-iccp-64mib.png", png_raw(48, 32, 8, 0, rows, extra=iccp))
    ztxt = chunk(b"zTXt", b"Comment\0\0" + bomb)
    save("decode_png", "inflate-bomb-ztxt-64mib.png", png_raw(48, 32, 8, 0, rows, extra=ztxt))
    itxt = chunk(b"iTXt", b"Comment\0\1\0\0\0" + bomb)
    save("decode_png", "inflate-bomb-itxt-64mib.png", png_raw(48, 32, 8, 0, rows, extra=itxt))


# --- JPEG ------------------------------------------------------------------------------------------

def with_sof_dimensions(jpeg, width, height):
    """The same JPEG with its frame header (SOF0/1/2) claiming another size."""
    data = bytearray(jpeg)
    i = 2
    while i < len(data):
        marker = data[i + 1]
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5:i + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        i += 2 + length
    raise ValueError("no SOF")


def jpegs():
    rgb = picture("RGB")
    for sub, name in [(0, "444"), (1, "422"), (2, "420")]:
        save("decode_jpeg", f"baseline-{name}.jpg", encode(rgb, "JPEG", quality=80, subsampling=sub))
    save("decode_jpeg", "progressive.jpg", encode(rgb, "JPEG", quality=80, progressive=True))
    save("decode_jpeg", "progressive-420-optimized.jpg", encode(rgb, "JPEG", progressive=True, optimize=True, subsampling=2))
    save("decode_jpeg", "grey.jpg", encode(picture("L"), "JPEG"))
    save("decode_jpeg", "cmyk.jpg", encode(picture("CMYK"), "JPEG"))
    save("decode_jpeg", "odd-33x17.jpg", encode(picture("RGB", (33, 17)), "JPEG"))
    save("decode_jpeg", "tiny-1x1.jpg", encode(picture("RGB", (1, 1)), "JPEG"))
    save("decode_jpeg", "exif-rotate270.jpg", encode(rgb, "JPEG", exif=exif_orientation(8)))
    save("decode_jpeg", "icc.jpg", encode(rgb, "JPEG", icc_profile=b"\0" * 128))
    small = encode(rgb, "JPEG", quality=50)
    save("decode_jpeg", "bomb-65500x65500.jpg", with_sof_dimensions(small, 65500, 65500))
    save("decode_jpeg", "bomb-8193x100.jpg", with_sof_dimensions(small, 8193, 100))
    save("decode_jpeg", "bomb-progressive-16000x16000.jpg",
         with_sof_dimensions(encode(rgb, "JPEG", progressive=True), 16000, 16000))


# --- WebP ------------------------------------------------------------------------------------------

def riff_chunks(data):
    i = 12
    while i + 8 <= len(data):
        kind, size = data[i:i + 4], struct.unpack("<I", data[i + 4:i + 8])[0]
        yield kind, i
        i += 8 + size + (size & 1)


def with_vp8x_canvas(webp, width, height):
    data = bytearray(webp)
    for kind, at in riff_chunks(data):
        if kind == b"VP8X":
            data[at + 12:at + 18] = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
            return bytes(data)
    raise ValueError("no VP8X")


def with_vp8l_size(webp, width, height):
    """A simple-format lossless WebP (RIFF + one VP8L chunk) of `webp`'s bitstream, claiming another size."""
    for kind, at in riff_chunks(webp):
        if kind == b"VP8L":
            size = struct.unpack("<I", webp[at + 4:at + 8])[0]
            chunk = bytearray(webp[at:at + 8 + size + (size & 1)])
            bits = struct.unpack("<I", chunk[9:13])[0]
            bits = (bits & ~0xFFFFFFF) | (width - 1) | ((height - 1) << 14)
            chunk[9:13] = struct.pack("<I", bits)
            return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + bytes(chunk)
    raise ValueError("no VP8L")


def webps():
    rgb, rgba = picture("RGB"), picture("RGBA")
    save("decode_webp", "lossy.webp", encode(rgb, "WEBP", quality=60))
    save("decode_webp", "lossless.webp", encode(rgb, "WEBP", lossless=True))
    save("decode_webp", "lossy-alpha.webp", encode(rgba, "WEBP", quality=60))
    save("decode_webp", "lossless-alpha.webp", encode(rgba, "WEBP", lossless=True))
    save("decode_webp", "odd-33x17.webp", encode(picture("RGB", (33, 17)), "WEBP", quality=60))
    save("decode_webp", "exif-rotate90.webp", encode(rgb, "WEBP", exif=exif_orientation(6)))
    save("decode_webp", "icc.webp", encode(rgb, "WEBP", icc_profile=b"\0" * 128))
    frames = [rgba, rgba.rotate(180)]
    save("decode_webp", "animated.webp", encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100))
    save("decode_webp", "animated-lossless.webp",
         encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100, lossless=True))
    extended = encode(rgba, "WEBP", lossless=True, icc_profile=b"\0" * 16)  # a profile: VP8X + VP8L
    save("decode_webp", "bomb-vp8x-16383x16383.webp", with_vp8x_canvas(extended, 16383, 16383))
    save("decode_webp", "bomb-vp8x-16777216x1.webp", with_vp8x_canvas(extended, 1 << 24, 1))
    lossless = encode(rgb, "WEBP", lossless=True)
    save("decode_webp", "bomb-vp8l-16000x16000.webp", with_vp8l_size(lossless, 16000, 16000))
    # image-webp 0.2.4 reads this one as 0 pixels wide ((1 + header) & 0x3FFF): refused as too small.
    save("decode_webp", "vp8l-16384x16384-read-as-0.webp", with_vp8l_size(lossless, 16384, 16384))
    animated = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100)
    save("decode_webp", "bomb-animated-16383x16383.webp", with_vp8x_canvas(animated, 16383, 16383))


# --- prompts and requests --------------------------------------------------------------------------

def prompts():
    cases = json.loads((ROOT.parent / "tests/data/diffusion/tokenizer_cases.json").read_text())
    picked = cases["cases"][::9] + cases["known_differences"][:3]
    for i, case in enumerate(picked):
        save("prompt", f"case-{i:02}.txt", case["text"].encode())
    save("prompt", "added-tokens.txt", "<|startoftext|>a cat<|endoftext|> on a mat<|endoftext|>".encode())
    save("prompt", "entities.txt", "caf&eacute; &amp;&#x1F600; &#128512;&lt;b&gt; &#0; &#xD800;".encode())
    save("prompt", "one-word.txt", ("supercalifragilistic" * 200).encode())


def requests():
    images = {
        "png": CORPUS / "decode_png/rgba.png",
        "webp": CORPUS / "decode_webp/lossy-alpha.webp",
        "jpeg-progressive": CORPUS / "decode_jpeg/progressive.jpg",
    }
    for name, path in images.items():
        doc = {"version": 1, "request_id": f"fuzz-{name}", "user_id": "u-1", "model": "arbitrary-style",
               "params": {"style_image": {"data": base64.b64encode(path.read_bytes()).decode()}, "size": 64,
                          "strength": 0.5},
               "image": {"data": base64.b64encode(path.read_bytes()).decode().rstrip("=")},
               "deadline": "2026-11-27T23:59:00+01:00", "created_at": "2026-11-27T23:58:00.123Z",
               "tier": "free", "progress": True}
        save("request", f"image-{name}.json", json.dumps(doc).encode())
    # Amplification probes: a small body that would become a large tree if parsed into a generic one.
    many = ",".join(["0"] * 4000)
    save("request", "amplify-array.json",
         f'{{"version":1,"request_id":"r","user_id":"u","model":"m","extra":[{many}]}}'.encode())
    save("request", "amplify-style-array.json",
         f'{{"version":1,"request_id":"r","user_id":"u","model":"m","params":{{"style":[{many}]}}}}'.encode())
    keys = ",".join(f'"{i}":1' for i in range(2000))
    save("request", "amplify-style-blend.json",
         f'{{"version":1,"request_id":"r","user_id":"u","model":"m","params":{{"style":{{{keys}}}}}}}'.encode())
    save("request", "amplify-prompt-array.json",
         f'{{"version":1,"request_id":"r","user_id":"u","model":"m","params":{{"prompt":[{many}]}}}}'.encode())
    save("request", "deep-nesting.json", b'{"version":1,"x":' + b"[" * 5000 + b"]" * 5000 + b"}")
    save("request", "escapes.json",
         '{"version":1,"request_id":"r\\u0041","user_id":"\\ud83d\\ude00","model":"m\\u0000","params":{"prompt":"\\ud800"}}'.encode())


def traceparents_and_cancels():
    save("traceparent", "valid.txt", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    save("traceparent", "future-version.txt",
         b"cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-will-be-like")
    save("traceparent", "zero-trace.txt", b" 00-00000000000000000000000000000000-00f067aa0ba902b7-00\t")
    save("cancel", "reason-escapes.json",
         b'{"version":1,"request_id":"3f1c2a9e","reason":"\\u00e9t\\u00e9 \\ud83d\\ude00 user closed the tab"}')


def main():
    # Inputs the fuzzer found (`found-*`, added by hand after the fix) are kept; the rest is rewritten.
    for target in ["decode_png", "decode_jpeg", "decode_webp", "prompt", "request", "traceparent", "cancel"]:
        for path in (CORPUS / target).glob("*"):
            if not path.name.startswith("found-"):
                path.unlink()
    pngs()
    jpegs()
    webps()
    prompts()
    requests()
    traceparents_and_cancels()


if __name__ == "__main__":
    main()
