#!/usr/bin/env bash
# Category precision@10 (`indexer eval relevance`) on the validation split, with the untrained
# ImageNet backbone as the floor beside the shipped embedder (and any other embedder files
# given as extra arguments):
#   benches/relevance.sh [DATA] [OUT] [EMBEDDER...]
# DATA defaults to ../shared/data, OUT to target/relevance. The gallery is the 1,000
# validation distractors of the CC0 catalog (senders with sender_id % 5 in {1, 3}) alone,
# indexed as a shop runs it (with detection), so the exact item is never there; the queries
# are the 808 annotated garments of the 200 validation street photos (CCP id % 5 == 1).
# About a minute per embedder (indexing) plus ten seconds per evaluation on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
OUT=${2:-target/relevance}
shift $(( $# > 2 ? 2 : $# ))
mkdir -p "$OUT"
cargo build --release --locked -p shoplens-indexer
INDEXER=target/release/indexer
[ -f "$OUT/evalgal/distractors/catalog.csv" ] || "$INDEXER" dataset eval-gallery --data "$DATA/street2shop-ccp" --catalog "$DATA/clothing-catalog" --out "$OUT/evalgal"
"$INDEXER" weights baseline-embedder --out models/embedder-imagenet-average.safetensors
for embedder in models/embedder-imagenet-average.safetensors models/embedder-lite0.safetensors "$@"; do
    name=$(basename "$embedder" .safetensors)
    db="$OUT/db-$name"
    rm -rf "$db"
    "$INDEXER" build --catalog "$OUT/evalgal/distractors/catalog.csv" --db "$db" --embedder "$embedder" > "$OUT/build-$name.log" 2>&1
    for ranking in default similarity; do
        flag=(); [ "$ranking" = similarity ] && flag=(--similarity-only)
        "$INDEXER" eval relevance --db "$db" --queries "$DATA/street2shop-ccp/user" --split val --boxes gt \
            --embedder "$embedder" "${flag[@]}" --out "$OUT/$name-gt-$ranking.json" | grep "precision@" | sed "s/^/$name gt $ranking: /"
    done
    "$INDEXER" eval relevance --db "$db" --queries "$DATA/street2shop-ccp/user" --split val --boxes detected \
        --embedder "$embedder" --out "$OUT/$name-detected-default.json" | grep "precision@" | sed "s/^/$name detected default: /"
done
