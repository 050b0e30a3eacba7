"""Rebuilds demo/catalog from the CC0 clothing catalog (../shared/data/clothing-catalog).

Deterministic: per label, the first skus in sorted order up to a quota proportional to the
label's share (at least 6), 300 photos in all; each resized to at most 320 px on its long
side (JPEG quality 78) so the demo stays a few MB. Titles are "<label> <first 8 sku chars>";
there are no prices or links in the source, so the demo has none.

    python3 demo/make_catalog.py ../shared/data/clothing-catalog demo/catalog
"""
import collections
import csv
import os
import shutil
import sys

from PIL import Image

TOTAL = 300
MAX_SIDE = 320


def main(src, dst):
    rows = list(csv.DictReader(open(os.path.join(src, "catalog.csv"))))
    by_label = collections.defaultdict(list)
    for r in sorted(rows, key=lambda r: r["sku"]):
        by_label[r["label"]].append(r)
    quota = {l: max(6, round(TOTAL * len(v) / len(rows))) for l, v in by_label.items()}
    while sum(quota.values()) > TOTAL:
        biggest = max(quota, key=quota.get)
        quota[biggest] -= 1
    if os.path.isdir(os.path.join(dst, "images")):
        shutil.rmtree(os.path.join(dst, "images"))
    os.makedirs(os.path.join(dst, "images"))
    out = []
    for label in sorted(by_label):
        for r in by_label[label][: quota[label]]:
            im = Image.open(os.path.join(src, r["image"])).convert("RGB")
            im.thumbnail((MAX_SIDE, MAX_SIDE), Image.LANCZOS)
            name = f"images/{r['sku']}.jpg"
            im.save(os.path.join(dst, name), quality=78)
            out.append({"sku": r["sku"], "image": name, "label": label, "title": f"{label} {r['sku'][:8]}", "sender_id": r["sender_id"]})
    with open(os.path.join(dst, "catalog.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["sku", "image", "label", "title", "sender_id"])
        w.writeheader()
        w.writerows(out)
    print(f"{len(out)} items in {dst}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
