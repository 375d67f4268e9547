#!/usr/bin/env bash
# s2s-proxy benchmark (issues 7 and 16): throughput, latency and CPU per request against
# nginx, HAProxy, Caddy and a bare hyper proxy (bench/floor, the floor) doing the same job,
# plus memory with idle connections, 1 GiB streams and first-request latency.
# Loopback only. Installs wrk, nginx, haproxy and caddy with apt-get when missing. Cleans up
# every process and temp file on exit. Results: a Markdown report on stdout (see
# bench/RESULTS.md).
#
#   bench/run.sh                 # defaults: 3 rounds of 10 s, 50 connections
#   ROUNDS=5 DURATION=15s CONNS=100 IDLE_CONNS=10000 bench/run.sh
#   CANDS="nginx haproxy floor s2s-1w" SCENARIOS=0 ROUNDS=3 DURATION=5s bench/run.sh  # quick A/B
#   ALT_BIN=/tmp/s2s-old CANDS="nginx s2s-1w s2s-alt" SCENARIOS=0 bench/run.sh    # two builds
#   CANDS="s2s-1w s2s-fleet" SCENARIOS=0 bench/run.sh   # fleet mode's added latency per request
#
# Optional candidate s2s-fleet: the s2s-1w set-up plus `cluster:` against a redis-server on
# loopback (CPU 1, with wrk) and `max_concurrent: 100000` on /bench/, which never binds: every
# request takes and releases a lease, i.e. one acquire round trip on its path (release and
# renewal run in the background). Needs redis-server (installed with apt-get when missing).
#
# Pinning (2+ cores): every one-worker proxy under test runs alone on CPU 0; wrk and the
# upstream share CPU 1. The "one worker per core" candidates (s2s-default: `workers` unset;
# nginx-auto: `worker_processes auto`) are left unpinned.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-50}
IDLE_CONNS=${IDLE_CONNS:-10000}
# Quick before/after comparisons: a subset of candidates, and no memory/stream scenarios.
CANDS=${CANDS:-direct nginx haproxy caddy floor s2s-1w nginx-auto s2s-default}
SCENARIOS=${SCENARIOS:-1}
MAX_LOAD=${MAX_LOAD:-1.0}        # wait (bounded) for the 1-min load average to drop below this
LOAD_WAIT=${LOAD_WAIT:-60}       # seconds, at most

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
bin=$target/release/s2s-proxy

log() { printf '%s\n' "$*" >&2; }

# --- tools ----------------------------------------------------------------------------
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v caddy >/dev/null || need+=(caddy)
case " $CANDS " in *" s2s-fleet "*) command -v redis-server >/dev/null || need+=(redis-server) ;; esac
if [ ${#need[@]} -gt 0 ]; then
    log "Installing ${need[*]} ..."
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >&2
fi
export PATH=$PATH:/usr/sbin
ncpu=$(nproc)
if [ "$ncpu" -ge 2 ]; then PROXY_CPU=0; LOAD_CPU=1; else PROXY_CPU=0; LOAD_CPU=0; fi
pin_proxy=(taskset -c "$PROXY_CPU")
pin_load=(taskset -c "$LOAD_CPU")

log "Building s2s-proxy and the floor (release) ..."
(cd "$repo" && cargo build --release --locked --quiet)
(cd "$here/floor" && CARGO_TARGET_DIR=$target cargo build --release --locked --quiet)
floor_bin=$target/release/s2s-floor

# --- temp dir, cleanup ----------------------------------------------------------------
T=$(mktemp -d /tmp/s2s-bench.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.3
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    [ -n "${KEEP_TMP:-}" ] || rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

read -r UP TOK NGX HAP S1 SD SF SINK SA FL CD NA FLT RD < <(python3 - <<'PY'
import socket
socks = [socket.socket() for _ in range(14)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
PY
)

# --- wait for a quiet machine (bounded) -------------------------------------------------
waited=0
while awk -v m="$MAX_LOAD" '{exit !($1 > m)}' /proc/loadavg && [ "$waited" -lt "$LOAD_WAIT" ]; do
    log "Load average $(cut -d' ' -f1-3 /proc/loadavg) above $MAX_LOAD; waiting ..."
    sleep 10; waited=$((waited + 10))
done
load_start=$(cut -d' ' -f1-3 /proc/loadavg)

# --- upstream, token issuer, big file (nginx, one worker, CPU 1) ------------------------
mkdir -p "$T/www" "$T/tmp"
truncate -s 1G "$T/www/big"
body='{"id":"4f2c9e1a-8b7d-4c3e-9a1f-2d6b8e0c5a73","status":"ok","items":[{"sku":"A-1001","qty":12,"price":"19.90"},{"sku":"B-2002","qty":3,"price":"4.50"}],"next":null,"ts":"2025-01-01T00:00:00Z","pad":"xxxxxxxxxxxxxxxx"}'
common_nginx="user root; worker_processes 1; daemon off; error_log $T/nginx-%s.err warn; pid $T/nginx-%s.pid;
events { worker_connections 4096; }"
cat > "$T/nginx-up.conf" <<NGX
$(printf "$common_nginx" up up)
http {
  access_log off;
  keepalive_requests 10000000;
  client_body_temp_path $T/tmp; proxy_temp_path $T/tmp; fastcgi_temp_path $T/tmp;
  uwsgi_temp_path $T/tmp; scgi_temp_path $T/tmp;
  sendfile on;
  server {
    listen 127.0.0.1:$UP;
    location = /big { root $T/www; default_type application/octet-stream; }
    location / { default_type application/json; return 200 '$body'; }
  }
  server {
    listen 127.0.0.1:$TOK;
    location = /token {
      access_log $T/token.log;
      default_type application/json;
      return 200 '{"token_type":"Bearer","expires_in":3599,"access_token":"bench"}';
    }
  }
}
NGX
"${pin_load[@]}" nginx -c "$T/nginx-up.conf" -e "$T/nginx-up.err" & pids+=($!)
"${pin_load[@]}" python3 "$here/sink.py" "$SINK" & pids+=($!)

# --- nginx as the reverse proxy (one worker, upstream keep-alive, CPU 0) ----------------
cat > "$T/nginx-px.conf" <<NGX
$(printf "$common_nginx" px px)
http {
  access_log off;
  keepalive_requests 10000000;
  client_body_temp_path $T/tmp; proxy_temp_path $T/tmp; fastcgi_temp_path $T/tmp;
  uwsgi_temp_path $T/tmp; scgi_temp_path $T/tmp;
  upstream up { server 127.0.0.1:$UP; keepalive 64; keepalive_requests 10000000; }
  server {
    listen 127.0.0.1:$NGX;
    location /bench/ {
      proxy_pass http://up/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer bench";
    }
  }
}
NGX
"${pin_proxy[@]}" nginx -c "$T/nginx-px.conf" -e "$T/nginx-px.err" & pids+=($!); ngx_pid=$!

# --- the same nginx with one worker per core (worker_processes auto, unpinned) -----------
sed -e 's/worker_processes 1;/worker_processes auto;/' -e "s/listen 127.0.0.1:$NGX;/listen 127.0.0.1:$NA;/" \
    -e "s#$T/nginx-px#$T/nginx-auto#g" "$T/nginx-px.conf" > "$T/nginx-auto.conf"
nginx -c "$T/nginx-auto.conf" -e "$T/nginx-auto.err" & pids+=($!)

# --- Caddy doing the same (one Go thread: GOMAXPROCS=1, CPU 0) ---------------------------
cat > "$T/Caddyfile" <<CADDY
{
  admin off
  auto_https off
}
http://127.0.0.1:$CD {
  handle_path /bench/* {
    reverse_proxy 127.0.0.1:$UP {
      header_up Authorization "Bearer bench"
      transport http {
        keepalive 60s
        keepalive_idle_conns_per_host 64
      }
    }
  }
}
CADDY
mkdir -p "$T/caddy-home"
HOME=$T/caddy-home XDG_DATA_HOME=$T/caddy-home XDG_CONFIG_HOME=$T/caddy-home GOMAXPROCS=1 \
    "${pin_proxy[@]}" caddy run --adapter caddyfile --config "$T/Caddyfile" >"$T/caddy.log" 2>&1 & pids+=($!); cd_pid=$!

# --- the floor: a bare hyper 1 proxy (bench/floor), one current-thread worker, CPU 0 -----
"${pin_proxy[@]}" "$floor_bin" "127.0.0.1:$FL" "127.0.0.1:$UP" 2>"$T/floor.err" & pids+=($!); fl_pid=$!

# --- HAProxy doing the same (nbthread 1, CPU 0) -----------------------------------------
cat > "$T/haproxy.cfg" <<HAP
global
  nbthread 1
  maxconn 4000
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend fe
  bind 127.0.0.1:$HAP
  default_backend be
backend be
  http-request set-header Authorization "Bearer bench"
  http-request replace-path /bench/(.*) /\1
  server up 127.0.0.1:$UP
HAP
"${pin_proxy[@]}" haproxy -db -f "$T/haproxy.cfg" 2>"$T/haproxy.err" & pids+=($!); hap_pid=$!

# --- s2s-proxy ------------------------------------------------------------------------
export BENCH_CLIENT_ID=bench-client BENCH_CLIENT_SECRET='bench~secret'
password=bench-password
hash=$(printf '%s' "$password" | "$bin" hash-secret)
auth="Basic $(printf 'bench:%s' "$password" | base64)"
s2s_config() { # name port workers
    {
        echo "server:"
        echo "  listen: 127.0.0.1:$2"
        [ -n "$3" ] && echo "  workers: $3"
        cat <<YAML
  limits:
    max_body_bytes: 2147483648
    max_connections: 12000
credentials:
  bench:
    type: client_secret
    token_url: http://127.0.0.1:$TOK/token
    client_id: \${BENCH_CLIENT_ID}
    client_secret: \${BENCH_CLIENT_SECRET}
clients:
  bench:
    basic: { username: bench, password: "$hash" }
routes:
  - prefix: /bench/
    upstream: http://127.0.0.1:$UP/
    credential: bench
    clients: [bench]
  - prefix: /sink/
    upstream: http://127.0.0.1:$SINK/
    credential: bench
    clients: [bench]
YAML
        if [ -n "${4:-}" ]; then # fleet mode: a lease per request on /bench/, never binding
            printf 'cluster:\n  redis: %s\n  key_prefix: bench\n' "$4"
        fi
    } > "$T/$1.yaml"
    if [ -n "${4:-}" ]; then
        sed -i '0,/    clients: \[bench\]/s//    clients: [bench]\n    max_concurrent: 100000\n    max_queue: 0/' "$T/$1.yaml"
    fi
}
start_s2s() { # name port workers pin... ; sets s2s_pid ($FLEET_REDIS: the cluster URL)
    local name=$1 port=$2 workers=$3; shift 3
    s2s_config "$name" "$port" "$workers" "${FLEET_REDIS:-}"
    NO_COLOR=1 RUST_LOG=info,s2s_proxy::access=off "$@" "${S2S_BIN:-$bin}" run --config "$T/$name.yaml" \
        >"$T/$name.log" 2>&1 &
    s2s_pid=$!; pids+=($s2s_pid)
    for _ in $(seq 100); do
        grep -qs 'Token fetched' "$T/$name.log" && return 0
        sleep 0.05
    done
    log "s2s-proxy $name did not fetch its token:"; cat "$T/$name.log" >&2; exit 1
}
kib() { awk -v k="$2" '$1==k":" {print $2}' "/proc/$1/status"; }
mib() { awk -v k="$1" 'BEGIN{printf "%.1f", k/1024}'; }

wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; log "port $1 not up"; exit 1; }
for p in $UP $TOK $NGX $HAP $SINK $NA $CD $FL; do wait_port "$p"; done

start_s2s s2s-1w "$S1" 1 "${pin_proxy[@]}"; s1_pid=$s2s_pid
sleep 0.5; s1_idle_kib=$(kib "$s1_pid" VmRSS)
start_s2s s2s-default "$SD" "" ; sd_pid=$s2s_pid
if [ -n "${ALT_BIN:-}" ]; then # A/B: another build as candidate "s2s-alt" (one worker)
    S2S_BIN=$ALT_BIN start_s2s s2s-alt "$SA" 1 "${pin_proxy[@]}"; sa_pid=$s2s_pid
fi
sleep 0.5; sd_idle_kib=$(kib "$sd_pid" VmRSS)
flt_pid=$s1_pid
case " $CANDS " in *" s2s-fleet "*)
    "${pin_load[@]}" redis-server --bind 127.0.0.1 --port "$RD" --save '' --appendonly no \
        >"$T/redis.log" 2>&1 & pids+=($!)
    wait_port "$RD"
    FLEET_REDIS="redis://127.0.0.1:$RD" start_s2s s2s-fleet "$FLT" 1 "${pin_proxy[@]}"; flt_pid=$s2s_pid
    for _ in $(seq 100); do # the fleet limits are in force once the probe reached Redis
        grep -qs 'fleet-wide limits in force' "$T/s2s-fleet.log" && break; sleep 0.05
    done
    grep -qs 'fleet-wide limits in force' "$T/s2s-fleet.log" \
        || { log "s2s-fleet did not reach Redis:"; cat "$T/s2s-fleet.log" >&2; exit 1; }
    got=$(curl -s -H "Authorization: $auth" "http://127.0.0.1:$FLT/bench/x")
    [ "$got" = "$body" ] || { log "unexpected answer from s2s-fleet: $got"; exit 1; }
    ;;
esac

# sanity: every candidate answers 200 with the upstream body
for url in "http://127.0.0.1:$UP/" "http://127.0.0.1:$NGX/bench/x" "http://127.0.0.1:$HAP/bench/x" \
           "http://127.0.0.1:$NA/bench/x" "http://127.0.0.1:$CD/bench/x" "http://127.0.0.1:$FL/bench/x" \
           "http://127.0.0.1:$S1/bench/x" "http://127.0.0.1:$SD/bench/x"; do
    got=$(curl -s -H "Authorization: $auth" "$url")
    [ "$got" = "$body" ] || { log "unexpected answer from $url: $got"; exit 1; }
done
[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$S1/bench/x")" = 401 ] \
    || { log "s2s-proxy accepted an unauthenticated request"; exit 1; }

# --- throughput and latency rounds ----------------------------------------------------
read -r -a cands <<< "$CANDS"
declare -A url=( [direct]="http://127.0.0.1:$UP/x" [nginx]="http://127.0.0.1:$NGX/bench/x"
                 [haproxy]="http://127.0.0.1:$HAP/bench/x" [s2s-1w]="http://127.0.0.1:$S1/bench/x"
                 [s2s-default]="http://127.0.0.1:$SD/bench/x" [s2s-alt]="http://127.0.0.1:$SA/bench/x"
                 [caddy]="http://127.0.0.1:$CD/bench/x" [floor]="http://127.0.0.1:$FL/bench/x"
                 [nginx-auto]="http://127.0.0.1:$NA/bench/x"
                 [s2s-fleet]="http://127.0.0.1:$FLT/bench/x" )
upw=$(pgrep -P "$(cat "$T/nginx-up.pid")" | head -1)
pxw=$(pgrep -P "$(cat "$T/nginx-px.pid")" | head -1)
naw=$(pgrep -P "$(cat "$T/nginx-auto.pid")" | tr '\n' ' ')
# The processes whose CPU time is the candidate's (nginx: its worker processes).
declare -A cpupid=( [direct]=$upw [nginx]=$pxw [haproxy]=$hap_pid [s2s-1w]=$s1_pid [s2s-default]=$sd_pid
                    [s2s-alt]=${sa_pid:-$s1_pid} [caddy]=$cd_pid [floor]=$fl_pid [nginx-auto]=$naw
                    [s2s-fleet]=$flt_pid )
ticks() { local u=0 s=0 p; for p in $1; do read -r pu ps < <(awk '{print $14, $15}' "/proc/$p/stat"); u=$((u + pu)); s=$((s + ps)); done; echo "$u $s"; }
clk=$(getconf CLK_TCK)

log "Warming up ..."
for c in "${cands[@]}"; do "${pin_load[@]}" wrk -t1 -c"$CONNS" -d1s -H "Authorization: $auth" "${url[$c]}" >/dev/null; done

echo -e "round\tcandidate\trps\tp50_ms\tp99_ms\tcpu_pct\terrors\tload1\tuser_us\tsys_us" > "$T/runs.tsv"
for ((r = 0; r < ROUNDS; r++)); do
    order=()
    for ((i = 0; i < ${#cands[@]}; i++)); do order+=("${cands[$(((i + r) % ${#cands[@]}))]}"); done
    if ((r % 2)); then mapfile -t order < <(printf '%s\n' "${order[@]}" | tac); fi
    log "Round $((r + 1))/$ROUNDS: ${order[*]} (load $(cut -d' ' -f1-3 /proc/loadavg))"
    for c in "${order[@]}"; do
        load1=$(cut -d' ' -f1 /proc/loadavg)
        read -r u0 k0 < <(ticks "${cpupid[$c]}"); s0=$(date +%s.%N)
        out=$("${pin_load[@]}" wrk -t1 -c"$CONNS" -d"$DURATION" --latency -H "Authorization: $auth" "${url[$c]}")
        read -r u1 k1 < <(ticks "${cpupid[$c]}"); s1=$(date +%s.%N)
        # CPU % of one core over the run; user and system CPU per request (wrk's count).
        echo "$out" | awk -v r=$((r + 1)) -v c="$c" -v l="$load1" -v hz="$clk" \
            -v du=$((u1 - u0)) -v dk=$((k1 - k0)) -v secs="$(awk -v a="$s0" -v b="$s1" 'BEGIN{print b-a}')" '
            function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
            $1=="50%" {p50=ms($2)} $1=="99%" {p99=ms($2)} /^Requests\/sec/ {rps=$2}
            / requests in / {n=$1}
            /Non-2xx/ {err+=$NF} /Socket errors/ {for(i=4;i<=NF;i+=2) {gsub(",","",$i); err+=$i}}
            END {n = n > 0 ? n : 1
                 printf "%s\t%s\t%.0f\t%.3f\t%.3f\t%.0f\t%d\t%s\t%.2f\t%.2f\n", r, c, rps, p50, p99,
                        (du+dk)/hz/secs*100, err, l, du/hz/n*1e6, dk/hz/n*1e6}' >> "$T/runs.tsv"
    done
done
s1_hwm_kib=$(kib "$s1_pid" VmHWM); sd_hwm_kib=$(kib "$sd_pid" VmHWM)
s1_after_kib=$(kib "$s1_pid" VmRSS)

if [ "$SCENARIOS" != 1 ]; then # quick A/B: the throughput table only
    python3 "$here/throughput.py" "$T/runs.tsv"
    exit 0
fi

# --- scenario: first request after start, 1 GiB streams, idle connections (fresh proxy) -
log "First request, streams, idle connections ..."
start_s2s s2s-fresh "$SF" 1 "${pin_proxy[@]}"; sf_pid=$s2s_pid
fresh_idle_kib=$(kib "$sf_pid" VmRSS)
first=$(curl -s -o /dev/null -w '%{time_total}' -H "Authorization: $auth" "http://127.0.0.1:$SF/bench/x")
warm=$(for _ in $(seq 21); do curl -s -o /dev/null -w '%{time_total}\n' -H "Authorization: $auth" "http://127.0.0.1:$SF/bench/x"; done | sort -n | sed -n 11p)
direct_one=$(for _ in $(seq 21); do curl -s -o /dev/null -w '%{time_total}\n' "http://127.0.0.1:$UP/x"; done | sort -n | sed -n 11p)

stream() { # label curl-args... ; prints "label MiB/s rss_growth_MiB status"
    local label=$1; shift
    local before; before=$(kib "$sf_pid" VmRSS)
    { echo 5 > "/proc/$sf_pid/clear_refs"; } 2>/dev/null || true   # reset VmHWM
    local res; res=$(curl -s -o /dev/null -w '%{http_code} %{size_download} %{size_upload} %{time_total}' "$@")
    local hwm; hwm=$(kib "$sf_pid" VmHWM)
    set -- $res
    awk -v l="$label" -v code="$1" -v d="$2" -v u="$3" -v t="$4" -v b="$before" -v h="$hwm" \
        'BEGIN{n=(d>u?d:u); printf "%s\t%.0f\t%.1f\t%.1f\t%s\t%d\n", l, n/1048576/t, (h-b)/1024, h/1024, code, n}'
}
{
    stream "download-direct" "http://127.0.0.1:$UP/big"
    stream "download-s2s" -H "Authorization: $auth" "http://127.0.0.1:$SF/bench/big"
    stream "upload-direct" -H 'Expect:' -T "$T/www/big" "http://127.0.0.1:$SINK/up"
    stream "upload-s2s" -H 'Expect:' -H "Authorization: $auth" -T "$T/www/big" "http://127.0.0.1:$SF/sink/up"
} > "$T/streams.tsv"
rm -f "$T/www/big"

idle=$(python3 "$here/idle_conns.py" 127.0.0.1 "$SF" /bench/x "$auth" "$sf_pid" "$IDLE_CONNS")
load_end=$(cut -d' ' -f1-3 /proc/loadavg)

# --- token requests -------------------------------------------------------------------
tok_issuer=$(wc -l < "$T/token.log")
tok_logged=""
tok_procs=0
for n in s2s-1w s2s-alt s2s-fleet s2s-default s2s-fresh; do
    [ -f "$T/$n.log" ] || continue
    tok_logged+="$n=$(grep -c 'Token fetched' "$T/$n.log") "
    tok_procs=$((tok_procs + 1))
done

# --- report ---------------------------------------------------------------------------
echo "## Throughput and latency (wrk -t1 -c$CONNS -d$DURATION, $ROUNDS rounds, medians)"
echo
python3 "$here/throughput.py" "$T/runs.tsv"
python3 - "$T/runs.tsv" "$T/streams.tsv" <<PY
import csv, statistics, sys
streams = [l.split("\t") for l in open(sys.argv[2]).read().splitlines()]
def mi(k): return float(k) / 1024
print()
print("## Memory\n")
print("| measure | MiB |")
print("| --- | ---: |")
print(f"| s2s-1w RSS idle after start (token fetched) | {mi($s1_idle_kib):.1f} |")
print(f"| s2s-default RSS idle after start | {mi($sd_idle_kib):.1f} |")
print(f"| s2s-1w peak RSS (VmHWM) over all rounds | {mi($s1_hwm_kib):.1f} |")
print(f"| s2s-1w RSS after the rounds | {mi($s1_after_kib):.1f} |")
print(f"| s2s-default peak RSS (VmHWM) over all rounds | {mi($sd_hwm_kib):.1f} |")
idle = dict(kv.split("=", 1) for kv in "$idle".split() if "=" in kv)
print(f"| fresh 1-worker proxy, RSS before idle connections | {mi(idle['rss_before_kib']):.1f} |")
print(f"| fresh 1-worker proxy with {idle['open']} idle keep-alive connections (failures {idle['failures']}, proxy fds {idle['proxy_fds']}) | {mi(idle['rss_idle_conns_kib']):.1f} |")
print(f"| same, peak (VmHWM) | {mi(idle['hwm_kib']):.1f} |")
print()
print("## 1 GiB streams (curl, fresh 1-worker proxy; RSS growth = VmHWM during transfer - RSS before)\n")
print("| transfer | MiB/s | proxy RSS growth MiB | proxy peak RSS MiB | HTTP | bytes |")
print("| --- | ---: | ---: | ---: | --- | ---: |")
for l, mbs, growth, peak, code, n in streams:
    direct = "direct" in l
    print(f"| {l} | {mbs} | {'-' if direct else growth} | {'-' if direct else peak} | {code} | {n} |")
print()
print("## First request after start\n")
print(f"- first request (token prefetched, new upstream connection): {float('$first')*1000:.2f} ms")
print(f"- warm request (median of 21 curls, each a new client connection): {float('$warm')*1000:.2f} ms")
print(f"- direct to upstream (median of 21 curls): {float('$direct_one')*1000:.2f} ms")
print()
print("## Token requests\n")
print(f"- token issuer access log: **$tok_issuer** requests for $tok_procs proxy processes, one (credential, scope) each")
print(f"- 'Token fetched.' per process: $tok_logged")
print()
print(f"Load average (1, 5, 15 min): start $load_start, end $load_end; cores: $ncpu; "
      f"date: $(date -u +%Y-%m-%dT%H:%MZ); idle_conns raw: $idle")
PY
