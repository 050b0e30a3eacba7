#!/usr/bin/env bash
# Runs every fuzz target for a bounded time and summarises what each found.
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]     (default 600 s, all six targets)
#
# Needs a nightly toolchain and cargo-fuzz (installed here when missing). Seeds: the
# committed ones in fuzz/seeds/, the server's hostile-input corpus and the CC0 fixtures.
# Crashes land in fuzz/artifacts/TARGET/; each one found becomes a regression test (see
# fuzz/README.md). Logs: fuzz/logs/TARGET.log; summary: fuzz/logs/summary.md.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(image_decode search_request df2_annotation catalog_parsers multipart request_framing)

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

seed() {
  local target=$1
  shift
  mkdir -p "corpus/$target"
  for f in "$@"; do
    [ -f "$f" ] && cp -n "$f" "corpus/$target/" || true
  done
}
hostile=(../searcher/tests/hostile/*.{jpg,png,gif,tif,tiff,webp,heic,bin} ../shared/tests/fixtures/lite0/*.{jpg,png})
seed image_decode "${hostile[@]}"
mkdir -p corpus/search_request
for q in "k=5" "k=3&box=10,10,40,40&category=top" "box=0,0,1e9,1e9" "k=-1&k=101&x=1" "category=&box=1,2,3"; do
  { printf '%s\n' "$q"; cat ../searcher/tests/hostile/photo.jpg; } > "corpus/search_request/$(echo "$q" | tr -c 'a-z0-9' '_')"
done
mkdir -p corpus/multipart
i=0
for ct in "multipart/form-data; boundary=B" "MULTIPART/FORM-DATA; boundary=\"a b\"" "multipart/form-data; boundary=C"; do
  i=$((i + 1))
  { printf '%s\n' "$ct"; printf -- '--B\r\nContent-Disposition: form-data; name="image"; filename="p.jpg"\r\n\r\n'; cat ../searcher/tests/hostile/photo.jpg; printf -- '\r\n--B--\r\n'; } > "corpus/multipart/form-$i"
done
printf 'multipart/form-data; boundary=C\n\n--C--\r\n' > corpus/multipart/actix-multipart-panic
mkdir -p corpus/request_framing
printf '\001GET / HTTP/1.1\r\nHost: x\r\n\r\n' > corpus/request_framing/get
printf '\007POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nabcdeGET /%070d HTTP/1.1\r\n\r\n' 0 > corpus/request_framing/length-then-long
printf '\003POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\nGET / HTTP/1.1\r\n\r\n' > corpus/request_framing/chunked
seed df2_annotation seeds/df2_annotation/*
seed catalog_parsers seeds/catalog_parsers/*

mkdir -p logs
{
  echo "# Fuzz run $(date -u +%Y-%m-%dT%H:%MZ), ${secs} s per target, $(rustc +nightly --version)"
  echo
  echo "| target | executions | exec/s | coverage (edges) | corpus | crashes |"
  echo "|---|---|---|---|---|---|"
} > logs/summary.md
for target in "${targets[@]}"; do
  echo "== $target (${secs} s)" >&2
  mkdir -p "artifacts/$target"
  before=$(ls "artifacts/$target" | wc -l)
  # -O: optimised with debug assertions; one worker (the machine has two cores).
  status=0
  cargo +nightly fuzz run -O "$target" "corpus/$target" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -max_len=262144 -timeout=30 -print_final_stats=1 \
    > "logs/$target.log" 2>&1 || status=$?
  after=$(ls "artifacts/$target" | wc -l)
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "logs/$target.log" | grep -o '[0-9]*$' || echo '?')
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "logs/$target.log" | grep -o '[0-9]*$' || echo '?')
  cov=$(grep -o 'cov: [0-9]*' "logs/$target.log" | tail -1 | grep -o '[0-9]*' || echo '?')
  corpus=$(ls "corpus/$target" | wc -l)
  echo "| $target | $execs | $rate | $cov | $corpus | $((after - before)) new (exit $status) |" >> logs/summary.md
done
cat logs/summary.md
