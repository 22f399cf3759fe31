#!/bin/sh
# transferlab's MLflow tracking server: PostgreSQL backend store, artifacts proxied to
# S3-compatible storage, basic auth, host validation. Configured only through the environment,
# so secrets come from Docker/Kubernetes Secrets and never sit in a file or on the command line:
#
#   MLFLOW_BACKEND_STORE_URI      postgresql://USER@HOST:5432/DB   (no password: libpq reads PGPASSWORD)
#   MLFLOW_AUTH_DATABASE_URI      postgresql://USER@HOST:5432/DB_AUTH  users and permissions
#   MLFLOW_ARTIFACTS_DESTINATION  s3://BUCKET/PREFIX  (endpoint: MLFLOW_S3_ENDPOINT_URL; keys: AWS_*)
#   MLFLOW_ALLOWED_HOSTS          comma-separated Host headers the server answers (e.g. mlflow.lab.example)
#   secrets: PGPASSWORD, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, MLFLOW_AUTH_ADMIN_PASSWORD,
#            MLFLOW_FLASK_SERVER_SECRET_KEY (CSRF; the same on every replica)
#   optional: MLFLOW_AUTH_ADMIN_USERNAME (admin), MLFLOW_AUTH_DEFAULT_PERMISSION (READ),
#             MLFLOW_HOST (0.0.0.0), MLFLOW_PORT (5000), MLFLOW_WORKERS (2)
# Extra arguments are passed on to `mlflow server`.
set -eu

need() {
    eval "value=\${$1:-}"
    if [ -z "$value" ]; then
        echo "transferlab-mlflow: $1 is not set ($2)" >&2
        exit 2
    fi
}
need MLFLOW_BACKEND_STORE_URI "e.g. postgresql://mlflow@postgres:5432/mlflow"
need MLFLOW_AUTH_DATABASE_URI "e.g. postgresql://mlflow@postgres:5432/mlflow_auth"
need MLFLOW_ARTIFACTS_DESTINATION "e.g. s3://mlflow-artifacts"
need MLFLOW_ALLOWED_HOSTS "the host names clients use, e.g. mlflow.lab.example,localhost:5000"
need MLFLOW_FLASK_SERVER_SECRET_KEY "a random string, from a Secret"

for uri in "$MLFLOW_BACKEND_STORE_URI" "$MLFLOW_AUTH_DATABASE_URI"; do
    case "$uri" in
        *://*:*@*)
            echo "transferlab-mlflow: a database URI holds a password; set PGPASSWORD from a Secret instead" >&2
            exit 2 ;;
    esac
done

# The auth app reads its settings from an ini file; this one holds no secret (the admin password
# comes from MLFLOW_AUTH_ADMIN_PASSWORD, used once to create the admin in an empty user store).
config_dir=$(mktemp -d)
cat > "$config_dir/basic_auth.ini" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$config_dir/basic_auth.ini"
export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"

exec mlflow server \
    --app-name basic-auth \
    --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
    --serve-artifacts \
    --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
    --allowed-hosts "$MLFLOW_ALLOWED_HOSTS" \
    --host "${MLFLOW_HOST:-0.0.0.0}" \
    --port "${MLFLOW_PORT:-5000}" \
    --workers "${MLFLOW_WORKERS:-2}" \
    "$@"
