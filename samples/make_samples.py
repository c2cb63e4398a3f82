"""Write samples/astronaut.jpg and samples/coffee.jpg from scikit-image's bundled photos.

Usage (from the repository root, with models/tools/requirements.txt installed):
    python samples/make_samples.py
See SOURCES.md for where the photos come from and their licences.
"""

import hashlib
import pathlib

import skimage
from PIL import Image

SKIMAGE_DATA = pathlib.Path(skimage.__file__).parent / "data"
OUT = pathlib.Path(__file__).resolve().parent

for name in ("astronaut", "coffee"):
    src = SKIMAGE_DATA / f"{name}.png"
    dst = OUT / f"{name}.jpg"
    # Pillow defaults otherwise: baseline, 4:2:0 chroma subsampling, no EXIF.
    Image.open(src).convert("RGB").save(dst, "JPEG", quality=90)
    print(f"{src.name} (sha256 {hashlib.sha256(src.read_bytes()).hexdigest()}) -> "
          f"samples/{dst.name} (sha256 {hashlib.sha256(dst.read_bytes()).hexdigest()}, "
          f"{dst.stat().st_size} bytes)")
