#!/usr/bin/env bash
# Fuzzes what devices and users control, with cargo fuzz (libFuzzer, nightly Rust,
# AddressSanitizer): the JSON decoder (its fast path must agree with serde_json), the
# broker door's packet reading, the config loader, and the SQL gate of /api/query. Each target runs SECONDS
# (default 120); new inputs that reach new code are kept in fuzz/corpus/<target>/
# (commit them: `the_fuzz_corpus_replays` replays the corpus in every test run), and a
# crash is kept in fuzz/artifacts/<target>/ and ends the script with its input.
#
#   scripts/fuzz.sh                 # every target
#   SECONDS_PER_TARGET=600 scripts/fuzz.sh door
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${SECONDS_PER_TARGET:-120}
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(decode door config sql)
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install -q cargo-fuzz --locked
cd fuzz
for target in "${TARGETS[@]}"; do
  mkdir -p "corpus/$target"
  echo "== $target: $SECONDS_PER_TARGET s"
  cargo +nightly fuzz run "$target" "corpus/$target" -- \
    -max_total_time="$SECONDS_PER_TARGET" -max_len=4096 -print_final_stats=1 2>&1 \
    | grep -E '^(stat::number_of_executed_units|stat::average_exec_per_sec|stat::new_units_added|#[0-9]+ +DONE)|panicked|ERROR|SUMMARY' || true
  if compgen -G "artifacts/$target/crash-*" >/dev/null; then
    echo "$target crashed; inputs in fuzz/artifacts/$target/" >&2
    exit 1
  fi
done
