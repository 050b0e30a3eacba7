#!/usr/bin/env bash
# The device check of issue 20, to run on a machine with a CUDA GPU and its toolkit:
#   bash benches/gpu-check.sh [CATALOG.csv]
# 1. builds what it needs with `--features cuda` (release, its own target/gpu);
# 2. runs the GPU parity tests (shared/tests/integration/gpu.rs: our depthwise kernel
#    against the CPU's bit for bit, the epilogue, backbone, detection and embedding on the
#    GPU against the CPU, two batched GPU builds bit for bit), which fail the script if
#    they fail;
# 3. times the backbone, detector and embedder forward passes at batch 1, 32 and 128;
# 4. indexes a catalog on the GPU in batches (default demo/catalog;
#    ../shared/data/clothing-catalog when present) and reads the embedding stage's items/s;
# 5. appends everything to benches/RESULTS.md (and prints it).
# Needs nvcc (PATH, $CUDA_HOME/bin or /usr/local/cuda/bin) and a driver; the build is about
# two thirds of the run. Nothing here has run on a GPU yet (no GPU machine so far).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)

for dir in "${CUDA_HOME:-}/bin" /usr/local/cuda/bin; do
    [ -x "$dir/nvcc" ] && export PATH="$dir:$PATH"
done
command -v nvcc >/dev/null || { echo "gpu-check: no nvcc (set CUDA_HOME or install the CUDA toolkit); nothing was checked" >&2; exit 2; }
command -v nvidia-smi >/dev/null || { echo "gpu-check: no nvidia-smi: no GPU driver here; nothing was checked" >&2; exit 2; }
gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}
echo "== $gpu, compute capability $CUDA_COMPUTE_CAP, $(nvcc --version | tail -1)"

T=target/gpu
echo "== build (cuda)"
cargo build --release --locked --target-dir "$T" --features shoplens-indexer/cuda,shoplens-benches/cuda -p shoplens-indexer -p shoplens-benches --bin indexer --bin gpu_forward
cargo test --release --locked --target-dir "$T" --features shoplens-shared/cuda -p shoplens-shared --test integration --no-run
built=$(date +%s)

echo "== parity with the CPU"
cargo test --release --locked --target-dir "$T" --features shoplens-shared/cuda -p shoplens-shared --test integration gpu:: -- --nocapture 2>&1 | tee "$T/parity.log"
grep -q "skipped" "$T/parity.log" && { echo "gpu-check: the parity tests did not see the GPU" >&2; exit 1; }

echo "== forward passes"
"$T/release/gpu_forward" --runs 20 | tee "$T/forward.md"

echo "== indexing on the GPU"
catalog=${1:-}
[ -n "$catalog" ] || { [ -f ../shared/data/clothing-catalog/catalog.csv ] && catalog=../shared/data/clothing-catalog/catalog.csv || catalog=demo/catalog/catalog.csv; }
db=$(mktemp -d)/gpu-db
"$T/release/indexer" build --catalog "$catalog" --db "$db" --json > "$T/build.json"
rate=$(grep -o '"embed_items_per_second":[0-9.]*' "$T/build.json" | cut -d: -f2)
items=$(grep -o '"items":[0-9]*' "$T/build.json" | head -1 | cut -d: -f2)
batch=$(grep -o '"batch":[0-9]*' "$T/build.json" | head -1 | cut -d: -f2)
echo "indexed $items items of $catalog in batches of $batch: $rate items/s in the embedding stage"

{
    echo
    echo "## $(date -u +%Y-%m-%d) — GPU check (\`benches/gpu-check.sh\`, issue 20): $gpu"
    echo
    echo "Build $((built - started)) s; parity tests: $(grep -o 'test result: [a-z]*\. [0-9]* passed' "$T/parity.log" | tail -1)."
    echo "Indexing \`$catalog\` ($items items, detection on, batches of $batch items): **$rate items/s**."
    echo
    cat "$T/forward.md"
} | tee -a benches/RESULTS.md
echo "== done in $(( $(date +%s) - started )) s"
