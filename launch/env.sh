# Sourced by the launch scripts: process-level settings that change speed, never results.
# tcmalloc (Debian/Ubuntu: apt-get install libtcmalloc-minimal4) removes XLA:CPU's allocation
# churn: 178x fewer minor page faults and 11x less system time per DP step of the quickstart
# network (docs/benchmarks.md section 7). Used when installed; DPDM_NO_TCMALLOC=1 turns it off.
if [ -z "${LD_PRELOAD:-}" ] && [ "${DPDM_NO_TCMALLOC:-0}" != 1 ]; then
  for lib in /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 /lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
             /usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4; do
    if [ -e "$lib" ]; then export LD_PRELOAD=$lib; break; fi
  done
fi
