#!/usr/bin/env bash
# Try examples/pc_proxy/Caddyfile for real, everything on loopback: a fake PC server, Caddy in
# front of it (tls internal, a bearer token), then --check and a run through it
#   1. with Caddy's root CA (API_CA_BUNDLE) and the token: works (exit 0)
#   2. without the token: Caddy answers 401, a clear error (exit 6)
#   3. without the CA: the certificate is refused, TLS_ERROR (exit 5)
# Needs caddy (Debian: apt-get install caddy) and a PostgreSQL for the run: DATABASE_URL, else
# TEST_DATABASE_URL, else postgresql://postgres@127.0.0.1:5432/postgres. Not part of the test
# suite: CI has no caddy. Usage: bash examples/pc_proxy/try_caddy.sh
set -euo pipefail

repo="$(cd "$(dirname "$0")/../.." && pwd)"
work="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

command -v caddy >/dev/null || { echo "caddy is not installed (Debian: apt-get install caddy)" >&2; exit 2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# The fake PC server, on loopback only (as the real one should be, behind the proxy).
python3 "$repo/tests/run_fake_server.py" --protocol pc --port 0 >"$work/fake.out" &
pids+=($!)
for _ in $(seq 50); do [ -s "$work/fake.out" ] && break; sleep 0.1; done
model_url="$(head -n1 "$work/fake.out")"
model_port="${model_url##*:}"

https_port="$(free_port)"
token="$(python3 -c 'import secrets; print(secrets.token_hex(24))')"
export PC_ADDRESS=127.0.0.1 PC_HTTPS_PORT="$https_port" MODEL_PORT="$model_port" PC_API_TOKEN="$token"
export CADDY_ADMIN="127.0.0.1:$(free_port)" XDG_DATA_HOME="$work/data" XDG_CONFIG_HOME="$work/config"
caddy run --config "$repo/examples/pc_proxy/Caddyfile" --adapter caddyfile >"$work/caddy.log" 2>&1 &
pids+=($!)
root="$XDG_DATA_HOME/caddy/pki/authorities/local/root.crt"
for _ in $(seq 100); do
    [ -s "$root" ] && python3 -c "import socket; socket.create_connection(('127.0.0.1', $https_port), 0.2)" 2>/dev/null && break
    sleep 0.2
done
[ -s "$root" ] || { echo "Caddy did not start:" >&2; cat "$work/caddy.log" >&2; exit 1; }
echo "fake PC server $model_url; Caddy on https://127.0.0.1:$https_port; root CA $root"

failures=0
# expect EXIT_CODE TEXT -- COMMAND...: run it (cwd: an empty folder, so no .env is read), show the output, check both.
expect() {
    local want="$1" text="$2"; shift 3
    local out code=0
    out="$(cd "$work" && "$@" 2>&1)" || code=$?
    echo "\$ ${*/$token/<token>}"
    echo "${out//$token/<token>}" | sed 's/^/    /'
    if [ "$code" = "$want" ] && grep -qF -- "$text" <<<"$out"; then
        echo "    -> exit $code, as expected"
    else
        echo "    -> UNEXPECTED: exit $code (wanted $want and \"$text\")"; failures=$((failures + 1))
    fi
}

export DATABASE_URL="${DATABASE_URL:-${TEST_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/postgres}}"
export API_BASE_URL="https://127.0.0.1:$https_port" LOG_FILE="$work/client.log"
unset API_KEY API_CA_BUNDLE REQUESTS_CA_BUNDLE
pipeline=(python3 "$repo/db_to_model_pipeline.py")

expect 0 "[ OK ] model server: https://127.0.0.1:$https_port: ready" -- env API_CA_BUNDLE="$root" API_KEY="$token" "${pipeline[@]}" --check
expect 0 "분석 결과" -- env API_CA_BUNDLE="$root" API_KEY="$token" "${pipeline[@]}" --query "SELECT 1 AS test"
expect 6 "HTTP 401" -- env API_CA_BUNDLE="$root" "${pipeline[@]}" --query "SELECT 1 AS test"
expect 6 "HTTP 401" -- env API_CA_BUNDLE="$root" API_KEY="wrong-token-0123456789" API_PROTOCOL=pc "${pipeline[@]}" --query "SELECT 1 AS test"
expect 5 "Error [TLS_ERROR]" -- env API_KEY="$token" "${pipeline[@]}" --query "SELECT 1 AS test"
expect 5 "Cannot connect securely" -- env API_KEY="$token" "${pipeline[@]}" --check

if [ "$failures" -eq 0 ]; then echo "All as expected."; else echo "$failures unexpected result(s)."; exit 1; fi
