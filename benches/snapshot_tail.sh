#!/usr/bin/env bash
# Write latency during snapshots against write latency between them, in one run.
#
#   benches/snapshot_tail.sh
#
# Starts 3 Trellis servers with their default snapshot settings through
# benches/kv_vs_etcd.sh, preloads BENCH_PRELOAD keys (default 1,000,000), then
# writes new keys over BENCH_CONNS connections in BENCH_SLICES consecutive 1 s
# wrk runs. Every server logs "snapshot started" and "snapshot taken"; a slice
# that overlaps any server's snapshot counts as "during", the others as
# "between" (the reference). Prints the mean and worst p99 of each kind of
# slice and the ratio of the means; the aim is a ratio of at most 2.
#
# Environment: BENCH_PRELOAD [1000000], BENCH_SLICES [120], BENCH_CONNS [16],
# BENCH_VALUE_SIZE [64], BENCH_TRELLIS_CONFIG (e.g. a raft_snapshot_interval),
# plus what benches/kv_vs_etcd.sh reads.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
export BENCH_PRELOAD=${BENCH_PRELOAD:-1000000} BENCH_SLICES=${BENCH_SLICES:-120}
export BENCH_CONNS=${BENCH_CONNS:-16} BENCH_VALUE_SIZE=${BENCH_VALUE_SIZE:-64} BENCH_SYSTEMS=trellis
LOGS=$(mktemp -d)
trap 'rm -rf "$LOGS"' EXIT
BENCH_KEEP_LOGS=$LOGS benches/kv_vs_etcd.sh >/dev/null 2>"$LOGS/bench.err" || {
  tail -n 20 "$LOGS/bench.err" >&2
  echo "benches/kv_vs_etcd.sh failed; run it with these settings to see why" >&2
  exit 1
}
leader=$(sed -n 's/.*trellis leader: \([^ ]*\).*/\1/p' "$LOGS/bench.err" | tail -n 1)
echo "leader: $leader (s1-s3 are 127.0.0.11-13)"
python3 - "$LOGS" <<'EOF'
import datetime, glob, re, statistics, sys

logs = sys.argv[1]
ansi = re.compile(r"\x1b\[[0-9;]*m")
windows = []
for path in sorted(glob.glob(f"{logs}/trellis-s*.log")):
    started = None
    for line in open(path, errors="replace"):
        line = ansi.sub("", line)
        m = re.match(r"(\S+Z)\s+INFO .*snapshot (started|taken)", line)
        if not m:
            continue
        at = datetime.datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp()
        if m.group(2) == "started":
            started = at
        elif started is not None:
            windows.append((started, at, path.rsplit("/", 1)[1]))
            started = None
slices = []
for line in open(f"{logs}/slices.txt"):
    _, k, start, end, p99, reqs, non2xx = line.split()
    assert int(non2xx) == 0, f"slice {k}: {non2xx} errors"
    slices.append((float(start), float(end), float(p99), int(reqs)))
first, last = slices[0][0], slices[-1][1]
inside = [w for w in windows if w[1] > first and w[0] < last]
during = [s for s in slices if any(w[0] < s[1] and w[1] > s[0] for w in inside)]
between = [s for s in slices if s not in during]
print(f"{len(slices)} slices of 1 s, {sum(s[3] for s in slices)} writes; {len(inside)} snapshots during them:")
for a, b, who in inside:
    print(f"  {who}: {a - first:6.1f} s to {b - first:6.1f} s ({b - a:.1f} s)")
for s in slices:
    who = sorted({w[2].split(".")[0][8:] for w in inside if w[0] < s[1] and w[1] > s[0]})
    if who:
        print(f"  slice at {s[0] - first:6.1f} s: p99 {s[2]:6.2f} ms while {'+'.join(who)} snapshotted")
if not during or not between:
    sys.exit("need slices both during and between snapshots: change BENCH_SLICES")
for name, group in (("during snapshots", during), ("between snapshots", between)):
    p = [s[2] for s in group]
    print(f"{name:18} {len(group):4} slices  p99 mean {statistics.mean(p):6.2f} ms  worst {max(p):6.2f} ms  writes/s {statistics.mean(s[3] for s in group):7.0f}")
ratio = statistics.mean(s[2] for s in during) / statistics.mean(s[2] for s in between)
print(f"p99 during snapshots / p99 between them: {ratio:.2f}x")
EOF
