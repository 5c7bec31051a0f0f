#!/usr/bin/env bash
# Runs one fuzz target with AFL++ (through cargo-afl, on stable Rust) for SECONDS:
#   scripts/fuzz.sh payload_frame 1800
# Targets: the binaries in fuzz/src/bin (lean_head, request_token, cursor, payload_frame,
# publish_body, pubsub_message, grants, settings). Starts from fuzz/corpus/TARGET, adds the new
# paths it finds back to that corpus, copies any crash to
# fuzz/regressions/TARGET (replayed by `cargo test`), and prints execs/s, paths and time.
# Installs cargo-afl (it builds AFL++ from source: needs a C compiler and make) when missing.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
target=${1:?usage: scripts/fuzz.sh TARGET SECONDS}
secs=${2:?usage: scripts/fuzz.sh TARGET SECONDS}
[ -f "src/bin/$target.rs" ] || { echo "fuzz.sh: no target $target in fuzz/src/bin" >&2; exit 2; }

command -v cargo-afl >/dev/null 2>&1 || cargo install --locked cargo-afl
cargo afl config --build >/dev/null 2>&1 || true
cargo afl build --release --bin "$target"

out=target/afl/$target
rm -rf "$out"
mkdir -p target/afl
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1
# Several targets may run at once on a small machine: let the kernel place them.
export AFL_NO_AFFINITY=1
cargo afl fuzz -i "corpus/$target" -o "$out" -V "$secs" -- "target/release/$target" >"$out.log" 2>&1 || true

stats=$out/default/fuzzer_stats
[ -f "$stats" ] || { echo "fuzz.sh: AFL++ did not run; see fuzz/$out.log" >&2; exit 1; }
mkdir -p "regressions/$target"
crashes=0
for c in "$out"/default/crashes/id:*; do
  [ -e "$c" ] || continue
  cp "$c" "regressions/$target/$(basename "$c" | tr ':,' '__')"
  crashes=$((crashes + 1))
done
# AFL++ queues only inputs that found new coverage: they join the corpus (named by content, so
# a rerun adds nothing twice).
for f in "$out"/default/queue/id:*; do
  [ -e "$f" ] || continue
  dest=corpus/$target/$(sha1sum "$f" | cut -c1-16)
  [ -e "$dest" ] || cp "$f" "$dest"
done
get() { awk -F': *' -v k="$1" '$1 ~ "^"k" *$" {print $2}' "$stats"; }
echo "$target: $(get run_time) s, $(get execs_done) execs ($(get execs_per_sec)/s), $(get corpus_count) paths, $crashes crashes, corpus now $(find "corpus/$target" -type f | wc -l) inputs"
