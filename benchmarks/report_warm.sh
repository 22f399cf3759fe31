#!/bin/bash
# Warm `transferlab report` (nothing changed: the kept report served) on an existing study, this
# checkout against another one, alternated round by round, with a bare `import mlflow` and a bare
# interpreter as floors. Each checkout gets its own TRANSFERLAB_CACHE; the first call of each is
# the cold report that fills it (printed, not counted). --no-log: the store is not written.
#
#   benchmarks/report_warm.sh sqlite:////path/mlflow.db STUDY /path/to/baseline/checkout [ROUNDS]
set -euo pipefail
URI=$1 STUDY=$2 BASE=$3 ROUNDS=${4:-5}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$HERE/.venv/bin/python}
WORK=$(mktemp -d /tmp/transferlab-report-warm.XXXXXX)
export RAY_AUTH_MODE=disabled
secs() { local t0 t1; t0=$(date +%s.%N); "$@" > /dev/null 2>&1; t1=$(date +%s.%N); echo "$t1 - $t0" | bc; }
report() { # checkout cache-name
  PYTHONPATH=$1 TRANSFERLAB_CACHE=$WORK/cache-$2 "$PY" -m orchestrator.cli report "$STUDY" \
    --tracking-uri "$URI" --out "$WORK/out-$2" --no-log
}
echo "cold: baseline $(secs report "$BASE" base) s, this checkout $(secs report "$HERE" new) s"
echo "round load baseline this import-mlflow python"
for r in $(seq 1 "$ROUNDS"); do
  echo "$r $(cut -d' ' -f1 /proc/loadavg) $(secs report "$BASE" base) $(secs report "$HERE" new)" \
    "$(secs "$PY" -c 'import mlflow') $(secs "$PY" -c pass)"
done
rm -rf "$WORK"
