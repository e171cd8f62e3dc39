#!/usr/bin/env bash
# `make demo`: the whole pipeline on the embedded defaults (SQLite metadata DB, LocalExecutor,
# local training backend) against a local HTTP server standing in for GEO, under Airflow's real
# scheduler. Demo data and state live in .demo/ (re-created each time), Airflow in .airflow/.
# Every process started here is stopped at the end by its PID (KEEP_UI=1 leaves Airflow and the
# data server running; stop them with `python scripts/airflow_local.py stop` and the PID file).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DEMO=${DEMO_DIR:-$ROOT/.demo}
export AIRFLOW_HOME=${AIRFLOW_HOME:-$ROOT/.airflow}
# shellcheck source=scripts/airflow_env.sh
source scripts/airflow_env.sh
export ATLASFLOW_CONFIG=$DEMO/atlasflow.yaml
PORT=${DEMO_HTTP_PORT:-8765}

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
stop_all() {
  python scripts/airflow_local.py stop >/dev/null 2>&1 || true
  if [ -f "$DEMO/geo_server.pid" ]; then
    kill "$(cat "$DEMO/geo_server.pid")" 2>/dev/null || true
    rm -f "$DEMO/geo_server.pid"
  fi
}
[ "${KEEP_UI:-0}" = 1 ] || trap stop_all EXIT

if [ -f "$DEMO/geo_server.pid" ] && kill -0 "$(cat "$DEMO/geo_server.pid")" 2>/dev/null; then
  kill "$(cat "$DEMO/geo_server.pid")"  # a server left by an earlier KEEP_UI=1 demo
fi
rm -rf "$DEMO"
mkdir -p "$DEMO/www"

say "1. A local stand-in for GEO on 127.0.0.1:$PORT, serving real cells (scanpy's pbmc68k_reduced) in 6 formats"
python -m atlasflow_testing.geo_server --root "$DEMO/www" --port "$PORT" --pid-file "$DEMO/geo_server.pid" \
  >"$DEMO/geo_server.log" 2>&1 &
for _ in $(seq 1 50); do [ -f "$DEMO/geo_server.pid" ] && break; sleep 0.1; done
sleep 0.3
kill -0 "$(cat "$DEMO/geo_server.pid" 2>/dev/null || echo 0)" 2>/dev/null \
  || { cat "$DEMO/geo_server.log"; echo "demo: the data server did not start (port $PORT busy? set DEMO_HTTP_PORT)" >&2; exit 1; }
python -m atlasflow_testing.demo --root "$DEMO" --url "http://127.0.0.1:$PORT"
atlasflow manifest check
atlasflow plan

say "2. A broken manifest is refused with every problem named (row, column, reason)"
cat > "$DEMO/bad_manifest.csv" <<EOF
dataset_id,download_url,type,expected_bytes
pbmc 1,http://127.0.0.1:$PORT/files/pbmc_1.h5ad,direct,
GSE12x,GSE12x,geo,
pbmc_3,s3://bucket/pbmc_3.h5ad,direct,six gigs
pbmc_3,http://127.0.0.1:$PORT/files/pbmc_3.loom,gel,
EOF
set +e
atlasflow manifest check "$DEMO/bad_manifest.csv"
bad_rc=$?
set -e
echo "(exit code $bad_rc)"
[ "$bad_rc" -eq 2 ] || { echo "demo: expected exit 2 for the broken manifest" >&2; exit 1; }

say "3. Airflow on 127.0.0.1 (api-server, scheduler, dag-processor, triggerer), settings from airflow_settings.yaml"
python scripts/airflow_local.py start
python -m atlasflow_airflow.settings apply airflow_settings.yaml
# unpaused before the ingest run, so the model Asset its publish updates starts a retraining run
python scripts/airflow_local.py unpause atlas_retrain

say "4. Run atlas_ingest: budget $(python -c 'from atlasflow.core.config import load_config; print(load_config().storage.max_storage_gb * 1000)') MB, so batches must wait for each other"
t0=$(date +%s)
python scripts/airflow_local.py trigger atlas_ingest --wait --timeout "${DEMO_TIMEOUT:-1800}"
echo "run finished in $(( $(date +%s) - t0 )) s"

say "5. atlas_retrain, started by the model Asset that publish updated: evaluate the new checkpoint, promote or keep"
retrain_rc=0
python scripts/airflow_local.py wait-next atlas_retrain --since "$t0" --timeout "${DEMO_RETRAIN_TIMEOUT:-600}" \
  || retrain_rc=$?

say "What the run did"
python scripts/demo_summary.py
[ "$retrain_rc" -eq 0 ] || echo "demo: the atlas_retrain run did not succeed (see its log in the UI)" >&2
if [ "${KEEP_UI:-0}" = 1 ]; then
  echo
  echo "KEEP_UI=1: Airflow and the data server keep running. Stop them with:"
  echo "  AIRFLOW_HOME=$AIRFLOW_HOME python scripts/airflow_local.py stop; kill \$(cat $DEMO/geo_server.pid)"
fi
exit "$retrain_rc"
