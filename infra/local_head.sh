# Sourced by the demo scripts: a private Ray head on 127.0.0.1 for this shell, stopped when it exits.
#
# Everything stays on loopback. Knobs (environment): RAY_PORT, DASHBOARD_PORT, RAY_START_ARGS (extra
# `ray start` arguments, e.g. other ports when a second head runs on this machine), RAY_AUTH_MODE.
# After `start_local_head`, RAY_DASHBOARD is the address `ray job submit` takes.
RAY_PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
RAY_DASHBOARD="http://127.0.0.1:$DASHBOARD_PORT"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}   # head and `ray job submit` must agree

# The working dir is uploaded to the cluster; data and run folders stay behind (jobs get absolute paths).
JOB_RUNTIME_ENV='{"excludes": ["data/", ".git/", "runs/", "**/__pycache__/"]}'

# The token file (~/.ray/auth_token, made once) is the key to every head it starts: its owner's alone.
make_auth_token() {
    (umask 077 && ray get-auth-token --generate >/dev/null)
    [ ! -f "$HOME/.ray/auth_token" ] || chmod 600 "$HOME/.ray/auth_token"   # also one made before, 0644
}

start_local_head() {
    [ "$RAY_AUTH_MODE" != token ] || make_auth_token
    HEAD_DIR=$(mktemp -d /tmp/vidscale-ray-XXXXXX)
    # Own temp dir, stopped by its PID: `ray stop` would kill every Ray on the machine.
    # shellcheck disable=SC2086
    ray start --head --block --node-ip-address 127.0.0.1 --port "$RAY_PORT" --dashboard-host 127.0.0.1 \
        --dashboard-port "$DASHBOARD_PORT" --temp-dir "$HEAD_DIR" --disable-usage-stats ${RAY_START_ARGS:-} \
        >"$HEAD_DIR/head.log" 2>&1 &
    HEAD_PID=$!
    trap stop_local_head EXIT
}

stop_local_head() { kill -TERM "$HEAD_PID" 2>/dev/null || true; wait "$HEAD_PID" 2>/dev/null || true; rm -rf "$HEAD_DIR"; }

wait_for_local_head() {
    echo "== waiting for the Ray head on 127.0.0.1:$DASHBOARD_PORT"
    for _ in $(seq 120); do
        ray job list --address "$RAY_DASHBOARD" >/dev/null 2>&1 && return 0
        kill -0 "$HEAD_PID" 2>/dev/null || { cat "$HEAD_DIR/head.log"; return 1; }
        sleep 1
    done
    echo "the Ray head did not answer within 120 s; its log: $HEAD_DIR/head.log" >&2
    return 1
}
