#!/bin/bash
# A CPU profile of a running server, kept as a flame graph SVG.
#
#   bench/profile.sh PID SECONDS OUT.svg "title" [PATTERN...]
#
# perf with DWARF call graphs (release builds keep no frame pointers), then
# bench/flamegraph.py (which prints, for each PATTERN, the share of samples
# with a matching frame). Run it while a confab-bench scenario loads the
# server.
set -euo pipefail
pid=$1 secs=$2 out=$3 title=$4
shift 4
data=$(mktemp --suffix=.perf.data)
trap 'rm -f "$data"' EXIT
perf record -q -F 199 --call-graph dwarf,16384 -p "$pid" -o "$data" -- sleep "$secs" 2>/dev/null
perf script -i "$data" 2>/dev/null | python3 "$(dirname "$0")/flamegraph.py" "$title" "$@" > "$out"
echo "wrote $out"
