#!/usr/bin/env python3
"""Outfits on a ghost mannequin: a stress set for the packshot rule (models/README.md).

Each validation street photo (CCP id % 5 == 1) of a DeepFashion2-format folder keeps the
pixels of its annotated garments (the item masks) and everything else is painted white:
several garments on one plain backdrop, the case where the rule must not merge garments.
Writes OUT/image/*.jpg and OUT/annos/*.json (the photo's own annotations), ready for
`indexer eval detection --data OUT --split val`.

    python3 benches/outfits_on_white.py ../shared/data/street2shop-ccp/user OUT

Needs numpy and Pillow.
"""
import json
import os
import shutil
import sys

import numpy as np
from PIL import Image


def main(source: str, out: str) -> None:
    os.makedirs(os.path.join(out, "image"), exist_ok=True)
    os.makedirs(os.path.join(out, "annos"), exist_ok=True)
    written = 0
    for name in sorted(os.listdir(os.path.join(source, "annos"))):
        stem = name[: -len(".json")]
        anno = json.load(open(os.path.join(source, "annos", name)))
        mask_path = os.path.join(source, "masks", stem + ".png")
        if anno["pair_id"] % 5 != 1 or not os.path.exists(mask_path):
            continue
        photo = np.asarray(Image.open(os.path.join(source, "image", stem + ".jpg")).convert("RGB")).copy()
        mask = np.asarray(Image.open(mask_path))
        if mask.shape != photo.shape[:2]:
            print(f"{stem}: mask and photo differ in size, skipped", file=sys.stderr)
            continue
        # Mask value 0 is no garment.
        photo[mask == 0] = 255
        Image.fromarray(photo).save(os.path.join(out, "image", stem + ".jpg"), quality=92)
        shutil.copy(os.path.join(source, "annos", name), os.path.join(out, "annos", name))
        written += 1
    print(f"{written} outfits on white in {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
