#!/usr/bin/env bash
# The deployed pipeline, as a shop runs it, on the validation split: the gallery (the 713
# validation shop cut-outs + 1,000 CC0 distractors of senders % 5 in {1, 3}) indexed WITH
# DETECTION, queries detected, DeepFashion2 retrieval rule; then the detector alone on the
# validation street photos and on the validation shop cut-outs (box AP and the served
# boxes per image), for the shipped detector or the detector files given as arguments.
#   [EMBEDDER=FILE] benches/deployed.sh [DATA] [OUT] [DETECTOR...]
# DATA defaults to ../shared/data, OUT to target/deployed. About 10 minutes a detector on
# 2 cores (indexing 1 minute, retrieval 1.5, detection on the 713 shop images 5.5: the
# evaluations embed each detected box for the detector's second look).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
OUT=${2:-target/deployed}
shift $(( $# > 2 ? 2 : $# ))
mkdir -p "$OUT"
cargo build --release --locked -p shoplens-indexer
INDEXER=target/release/indexer
CCP="$DATA/street2shop-ccp"
[ -f "$OUT/evalgal/distractors/catalog.csv" ] || "$INDEXER" dataset eval-gallery --data "$CCP" --catalog "$DATA/clothing-catalog" --out "$OUT/evalgal"
# The embedder of the gallery, the queries and the detector's second look.
EMBEDDER=${EMBEDDER:-models/embedder-lite0.safetensors}
DETECTORS=("$@")
[ ${#DETECTORS[@]} -gt 0 ] || DETECTORS=(models/detector-lite0.safetensors)
for detector in "${DETECTORS[@]}"; do
    name=$(basename "$detector" .safetensors)
    db="$OUT/db-$name"
    rm -rf "$db"
    "$INDEXER" build --catalog "$OUT/evalgal/shop" --catalog "$OUT/evalgal/distractors/catalog.csv" --db "$db" --detector "$detector" --embedder "$EMBEDDER" --json > "$OUT/build-$name.json" 2> "$OUT/build-$name.log"
    echo "$name: $(grep -o '"garments":[0-9]*' "$OUT/build-$name.json" | head -1) indexed for 1,713 gallery images"
    "$INDEXER" eval retrieval --db "$db" --queries "$CCP/user" --query-gt "$CCP/query_gt.json" --gallery-gt "$CCP/gallery_gt.json" \
        --split val --boxes detected --detector "$detector" --embedder "$EMBEDDER" --out "$OUT/$name-retrieval.json" | grep "gallery garments" | sed "s/^/$name deployed: /"
    for domain in user shop; do
        "$INDEXER" eval detection --data "$CCP/$domain" --weights "$detector" --embedder "$EMBEDDER" --split val --out "$OUT/$name-detection-$domain.json" \
            | grep -E "^mean AP50|^class-agnostic|^served" | sed "s/^/$name $domain: /"
    done
done
