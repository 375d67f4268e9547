#!/usr/bin/env bash
# Profile s2s-proxy's request path (issue 7, item 4). Loopback only; cleans up on exit.
#
#   bench/profile.sh callgrind   # instruction counts per request (valgrind), annotated
#   bench/profile.sh perf        # sampled CPU profile under wrk load (perf record)
#   bench/profile.sh syscalls    # system calls per request (strace -c), s2s-proxy and nginx
#   bench/profile.sh idle        # RSS with IDLE_CONNS (10000) idle keep-alive connections
#   S2S_BIN=/path/to/other/s2s-proxy bench/profile.sh callgrind   # profile another build
#   FLOOR=1 bench/profile.sh callgrind   # the same load through bench/floor (the bare hyper proxy)
#
# Same set-up as run.sh: nginx upstream returning ~200 bytes, nginx token issuer, one route,
# Basic client, one worker (WORKERS=N for N; WORKERS= for `workers` unset, one per core).
# The counters are zeroed after start-up and warm-up, so the callgrind totals divided by
# the request count are the cost of one request.
set -euo pipefail
mode=${1:-callgrind}
REQUESTS=${REQUESTS:-20000}
WORKERS=${WORKERS-1}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
bin=${CARGO_TARGET_DIR:-$repo/target}/release/s2s-proxy
export PATH=$PATH:/usr/sbin
if [ -n "${S2S_BIN:-}" ]; then bin=$S2S_BIN    # another build, for A/B comparisons
else (cd "$repo" && cargo build --release --locked --quiet); fi

T=$(mktemp -d /tmp/s2s-prof.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 0.3; [ -n "${KEEP_TMP:-}" ] && echo "kept $T" || rm -rf "$T"; }
trap cleanup EXIT
read -r UP TOK PX < <(python3 -c 'import socket
s=[socket.socket() for _ in range(3)]
[x.bind(("127.0.0.1",0)) for x in s]
print(*[x.getsockname()[1] for x in s])')
cat > "$T/nginx.conf" <<NGX
user root; worker_processes 1; daemon off; error_log $T/nginx.err warn; pid $T/nginx.pid;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 10000000;
  client_body_temp_path $T; proxy_temp_path $T; fastcgi_temp_path $T; uwsgi_temp_path $T; scgi_temp_path $T;
  server { listen 127.0.0.1:$UP; location / { default_type application/json;
    return 200 '{"id":"4f2c9e1a-8b7d-4c3e-9a1f-2d6b8e0c5a73","status":"ok","items":[{"sku":"A-1001","qty":12,"price":"19.90"},{"sku":"B-2002","qty":3,"price":"4.50"}],"next":null,"ts":"2025-01-01T00:00:00Z","pad":"xxxxxxxxxxxxxxxx"}'; } }
  server { listen 127.0.0.1:$TOK; location = /token { default_type application/json;
    return 200 '{"token_type":"Bearer","expires_in":3599,"access_token":"bench"}'; } } }
NGX
nginx -c "$T/nginx.conf" -e "$T/nginx.err" & pids+=($!)
export BENCH_CLIENT_ID=bench-client BENCH_CLIENT_SECRET='bench~secret'
hash=$(printf bench-password | "$bin" hash-secret)
auth="Basic $(printf bench:bench-password | base64)"
cat > "$T/proxy.yaml" <<YAML
server: { listen: "127.0.0.1:$PX", ${WORKERS:+workers: $WORKERS,} limits: { max_connections: 12000 } }
credentials:
  bench: { type: client_secret, token_url: "http://127.0.0.1:$TOK/token", client_id: "\${BENCH_CLIENT_ID}", client_secret: "\${BENCH_CLIENT_SECRET}" }
clients:
  bench: { basic: { username: bench, password: "$hash" } }
routes:
  - { prefix: /bench/, upstream: "http://127.0.0.1:$UP/", credential: bench, clients: [bench] }
YAML
export NO_COLOR=1 RUST_LOG=info,s2s_proxy::access=off
up() { for _ in $(seq 600); do curl -fs -o /dev/null -H "Authorization: $auth" "http://127.0.0.1:$PX/bench/x" && return 0; sleep 0.1; done; exit 1; }
case $mode in
callgrind)
    if [ -n "${FLOOR:-}" ]; then
        (cd "$here/floor" && CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target} cargo build --release --locked --quiet)
        cmd=("$(dirname "$bin")/s2s-floor" "127.0.0.1:$PX" "127.0.0.1:$UP")
    else
        cmd=("$bin" run --config "$T/proxy.yaml")
    fi
    valgrind --tool=callgrind --callgrind-out-file="$T/cg.out" --dump-instr=no \
        "${cmd[@]}" 2>"$T/vg.err" & pids+=($!); vg=$!
    up
    wrk -t1 -c4 -d3s -H "Authorization: $auth" "http://127.0.0.1:$PX/bench/x" >/dev/null  # warm-up
    callgrind_control -z "$vg" >/dev/null
    # A fixed number of requests over 4 keep-alive connections.
    out=$(wrk -t1 -c4 -d20s -H "Authorization: $auth" "http://127.0.0.1:$PX/bench/x")
    n=$(echo "$out" | awk '/requests in/ {print $1}')
    callgrind_control -d "$vg" >/dev/null; sleep 1
    f=$(ls -t "$T"/cg.out* | head -1)
    total=$(callgrind_annotate "$f" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",","",$1); print $1}')
    echo "requests: $n; instructions: $total; per request: $((total / n))"
    echo "--- inclusive (top 60) ---"
    callgrind_annotate --inclusive=yes --threshold=100 "$f" 2>/dev/null | sed -n '1,200p' | grep -v '^$' | head -90
    echo "--- self (top 60) ---"
    callgrind_annotate --threshold=100 "$f" 2>/dev/null | grep -v '^$' | head -90
    ;;
perf)
    taskset -c 0 "$bin" run --config "$T/proxy.yaml" 2>"$T/proxy.err" & pids+=($!); px=$!
    up
    taskset -c 1 wrk -t1 -c50 -d12s -H "Authorization: $auth" "http://127.0.0.1:$PX/bench/x" >/dev/null & wrk_pid=$!
    sleep 2
    # PERF_CALLGRAPH=dwarf gives inclusive costs natively (the binary has no frame pointers).
    perf record -F 2999 --call-graph "${PERF_CALLGRAPH:-fp}" -p "$px" -o "$T/perf.data" -- sleep "${PERF_SECONDS:-8}" 2>/dev/null >/dev/null
    wait "$wrk_pid"
    rep() { perf report -i "$T/perf.data" --no-children --stdio "$@" 2>/dev/null | grep -E '^ +[0-9]' | sed 's/  \+- .*$//; s/ *$//' || true; }
    echo "--- by shared object ---"; rep --sort dso | awk 'NR <= 8'
    echo "--- by symbol (self) ---"; rep --sort dso,symbol | awk 'NR <= 70'
    echo "--- user-space symbols, grouped (self) ---"
    rep --sort symbol | grep -v '\[k\]' | awk 'NR <= 40'
    # Callers of the top kernel symbol and of the top user-space one (memcpy, malloc ...).
    for top in "$(rep --sort symbol | awk 'NR == 1 {print $3}')" \
               "$(rep --sort symbol | grep -v '\[k\]' | awk 'NR == 1 {print $3}')"; do
        echo "--- who calls $top ---"
        perf report -i "$T/perf.data" --no-children --stdio -S "$top" -G 2>/dev/null \
            | grep -E '[a-z_]' | grep -v '^#' | sed 's/ *$//' | awk 'NR <= 80' || true
    done
    ;;
idle)
    ulimit -n 65536 2>/dev/null || true
    ${WRAP:-} "$bin" run --config "$T/proxy.yaml" 2>"$T/proxy.err" & pids+=($!); px=$!
    up; sleep 0.3
    python3 "$here/idle_conns.py" 127.0.0.1 "$PX" /bench/x "$auth" "$px" "${IDLE_CONNS:-10000}"
    ;;
syscalls)
    # nginx as the reverse proxy doing the same job, for comparison.
    read -r NPX < <(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    cat > "$T/nginx-px.conf" <<NGX
user root; worker_processes 1; daemon off; error_log $T/px.err warn; pid $T/px.pid;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 10000000;
  client_body_temp_path $T; proxy_temp_path $T; fastcgi_temp_path $T; uwsgi_temp_path $T; scgi_temp_path $T;
  upstream up { server 127.0.0.1:$UP; keepalive 64; }
  server { listen 127.0.0.1:$NPX; location /bench/ { proxy_pass http://up/; proxy_http_version 1.1;
    proxy_set_header Connection ""; proxy_set_header Authorization "Bearer bench"; } } }
NGX
    nginx -c "$T/nginx-px.conf" -e "$T/px.err" & pids+=($!)
    "$bin" run --config "$T/proxy.yaml" 2>"$T/proxy.err" & pids+=($!); px=$!
    up; sleep 0.3
    count() { # name pid port
        wrk -t1 -c4 -d1s -H "Authorization: $auth" "http://127.0.0.1:$3/bench/x" >/dev/null
        strace -c -f -o "$T/$1.strace" -p "$2" & local st=$!
        sleep 0.5
        local n; n=$(wrk -t1 -c4 -d3s -H "Authorization: $auth" "http://127.0.0.1:$3/bench/x" | awk '/requests in/ {print $1}')
        sleep 0.3; kill -INT "$st"; wait "$st" 2>/dev/null || true
        # CPU per request without strace: user and system time over a second run.
        local t0; t0=$(awk '{print $14, $15}' "/proc/$2/stat")
        local m; m=$(wrk -t1 -c4 -d3s -H "Authorization: $auth" "http://127.0.0.1:$3/bench/x" | awk '/requests in/ {print $1}')
        local t1; t1=$(awk '{print $14, $15}' "/proc/$2/stat")
        echo "--- $1: $n requests ---"
        echo "$t0 $t1" | awk -v m="$m" -v k="$(getconf CLK_TCK)" \
            '{printf "cpu per request (no strace, %d requests): user %.1f us, system %.1f us\n", m, ($3-$1)/k/m*1e6, ($4-$2)/k/m*1e6}'
        awk -v n="$n" 'NR > 2 && $NF != "total" && $4 ~ /^[0-9]+$/ {printf "%-16s %8.2f per request\n", $NF, $4 / n}
                       $NF == "total" {printf "%-16s %8.2f per request\n", "total", $3 / n}' "$T/$1.strace"
    }
    count s2s-proxy "$px" "$PX"
    count nginx "$(pgrep -P "$(cat "$T/px.pid")" | head -1)" "$NPX"
    ;;
esac
