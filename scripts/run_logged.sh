# Sourced by the GPU scripts: `run NAME TIMEOUT_S CMD...` runs CMD with a time limit, its output in
# $OUT/NAME.log and its exit status and last lines in $OUT/summary.txt, and never stops the script, so
# that a run cut short keeps what it finished. Needs OUT set; starts the clock that `elapsed` reads.
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
run() {
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(elapsed) s elapsed): $*" | tee -a "$OUT/summary.txt"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "   exit $? after $(elapsed) s" | tee -a "$OUT/summary.txt"
    tail -n 15 "$OUT/$name.log" | tee -a "$OUT/summary.txt"
}
