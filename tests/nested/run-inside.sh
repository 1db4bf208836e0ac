# Runs inside the nested-KVM outer VM (tests/nested/outer.py): RESULTS/command.sh, from the
# checkout, as root, its output in RESULTS/output.log and its exit status in RESULTS/status.
# RESULTS/ps.txt shows the processes every 20 s (what a slow or stuck run is doing).
. "$(dirname "$0")/inside.sh"
cd "$CHECKOUT" || finish 2
(while sleep 20; do
   { date; ps -eo pid,ppid,etime,time,args | grep -v ' \[' | cut -c1-240; } > "$RESULTS/ps.tmp"
   mv "$RESULTS/ps.tmp" "$RESULTS/ps.txt"
 done) &
timeout "${INSIDE_TIMEOUT:-1200}" sh "$RESULTS/command.sh" > "$RESULTS/output.log" 2>&1
finish $?
