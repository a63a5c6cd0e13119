# Sourced by the build scripts: waits for a background build, printing its progress every 30 s.
#   wait_for_build PID LOG PATTERN LABEL   (PATTERN: a grep -o pattern of the build's step counter)
wait_for_build() {
  local pid=$1 log=$2 pattern=$3 label=$4 start=$SECONDS step
  while kill -0 "$pid" 2>/dev/null; do
    sleep 30
    step=$(grep -o "$pattern" "$log" | tail -1 || true)
    echo "  building $label: ${step:-configuring} after $((SECONDS - start)) s"
  done
  wait "$pid"
}
