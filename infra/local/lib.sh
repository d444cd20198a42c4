# Shared by up, status and down: where things live, how each service is installed, started,
# checked and stopped. Sourced, never run.
#
# Everything downloaded or built is cached under $QUIKAPP_INFRA_HOME, outside any clone, so a
# second `up` on a warm machine only starts processes. Its default is ~/.cache/quikapp, or
# /var/cache/quikapp for root: the servers then run as an unprivileged user, who cannot enter /root.
set -euo pipefail

INFRA_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ "$(id -u)" = 0 ]; then default_home=/var/cache/quikapp; else default_home=$HOME/.cache/quikapp; fi
QUIKAPP_INFRA_HOME=${QUIKAPP_INFRA_HOME:-$default_home}
DIST=$QUIKAPP_INFRA_HOME/dist
DATA=${QUIKAPP_INFRA_DATA:-$QUIKAPP_INFRA_HOME/data}

PG_PORT=${QUIKAPP_PG_PORT:-55432}
REDIS_PORT=${QUIKAPP_REDIS_PORT:-56379}
KAFKA_PORT=${QUIKAPP_KAFKA_PORT:-59092}
KAFKA_CONTROLLER_PORT=${QUIKAPP_KAFKA_CONTROLLER_PORT:-59093}
OPENSEARCH_PORT=${QUIKAPP_OPENSEARCH_PORT:-59200}
OPENSEARCH_TRANSPORT_PORT=${QUIKAPP_OPENSEARCH_TRANSPORT_PORT:-59300}
FERRETDB_PORT=${QUIKAPP_FERRETDB_PORT:-57017}

KAFKA_VERSION=4.1.1
OPENSEARCH_VERSION=2.19.6
FERRETDB_VERSION=v1.24.2
KAFKA_TOPICS="quikapp.messages.events quikapp.workspaces.events quikapp.messages.events.dlq"
KAFKA_PARTITIONS=12
# Seconds a service may take to become healthy before `up` gives up on it.
START_TIMEOUT=${QUIKAPP_INFRA_START_TIMEOUT:-120}

SERVICES="postgres redis kafka opensearch ferretdb"
# Java servers and PostgreSQL refuse to run as root; on a root machine they run as this user.
SERVICE_USER=quikapp

log() { printf '[infra] %s\n' "$*" >&2; }

die_with_log() { # service, message
  local svc=$1; shift
  log "$svc: $*"
  if [ -f "$DATA/$svc.log" ]; then
    log "last lines of $DATA/$svc.log:"
    tail -n 40 "$DATA/$svc.log" >&2
  fi
  exit 1
}

# Runs a command as the unprivileged service user when we are root, else as ourselves.
as_service_user() {
  if [ "$(id -u)" = 0 ]; then runuser -u "$SERVICE_USER" -- "$@"; else "$@"; fi
}

# The default ports lie in Linux's ephemeral range (32768-60999), so an outgoing connection, say
# a Kafka client's, may hold one of them as its local port when a server starts, which then fails
# with "Address already in use". Reserving them keeps the kernel from handing them out; it needs
# root (or a writable sysctl), and without it `up` warns and goes on.
reserve_ports() {
  local file=/proc/sys/net/ipv4/ip_local_reserved_ports
  local ports="$PG_PORT,$REDIS_PORT,$KAFKA_PORT,$KAFKA_CONTROLLER_PORT,$OPENSEARCH_PORT,$OPENSEARCH_TRANSPORT_PORT,$FERRETDB_PORT"
  local current; current=$(cat "$file" 2>/dev/null || true)
  if ! { [ -w "$file" ] && echo "${current:+$current,}$ports" > "$file"; } 2>/dev/null; then
    log "could not reserve ports $ports (needs root): a server may find its port taken by a client"
  fi
}

ensure_service_user() {
  [ "$(id -u)" = 0 ] || return 0
  id "$SERVICE_USER" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$SERVICE_USER"
}

apt_install() { # packages...
  log "installing Debian packages: $*"
  local sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

java_home() { dirname "$(dirname "$(readlink -f "$(command -v java)")")"; }

# Waits until `check` succeeds, or fails loudly naming the service with the tail of its log.
wait_healthy() { # service check-function
  local svc=$1 check=$2 deadline=$((SECONDS + START_TIMEOUT))
  until "$check" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then die_with_log "$svc" "not healthy after ${START_TIMEOUT}s"; fi
    if [ -f "$DATA/$svc.pid" ] && ! kill -0 "$(cat "$DATA/$svc.pid")" 2>/dev/null; then
      die_with_log "$svc" "process exited during start"
    fi
    sleep 0.5
  done
}

# Whether the service's recorded process runs, and is that service: after a machine restart a
# stale pid file can name an unrelated process that reused the number.
pid_alive() { # service
  local pid
  pid=$(cat "$DATA/$1.pid" 2>/dev/null) || return 1
  kill -0 "$pid" 2>/dev/null && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$(process_marker "$1")"
}

process_marker() { # service: a word every command line of that service's process contains
  case $1 in
    postgres) echo "postgres" ;;
    redis) echo "redis-server" ;;
    kafka) echo "kafka.Kafka" ;;
    opensearch) echo "org.opensearch.bootstrap.OpenSearch" ;;
    ferretdb) echo "$FERRETDB_BIN" ;;
  esac
}

stop_pid() { # service
  local svc=$1
  pid_alive "$svc" || { rm -f "$DATA/$svc.pid"; return 0; }
  local pid; pid=$(cat "$DATA/$svc.pid")
  kill "$pid"
  for _ in $(seq 1 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  rm -f "$DATA/$svc.pid"
}

# ---------------------------------------------------------------- PostgreSQL (Debian package)
pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
pg_url() { echo "postgres://quikapp:quikapp@127.0.0.1:$PG_PORT/${1:-quikapp}"; }

install_postgres() {
  [ -n "$(pg_bin)" ] || apt_install postgresql
}

start_postgres() {
  local bin; bin=$(pg_bin)
  local dir=$DATA/postgres
  if [ ! -f "$dir/PG_VERSION" ]; then
    mkdir -p "$dir"; [ "$(id -u)" = 0 ] && chown "$SERVICE_USER" "$dir"
    chmod 700 "$dir"
    as_service_user "$bin/initdb" -D "$dir" -U quikapp --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
  fi
  if ! pid_alive postgres; then
    touch "$DATA/postgres.log"; [ "$(id -u)" = 0 ] && chown "$SERVICE_USER" "$DATA/postgres.log"
    as_service_user "$bin/pg_ctl" -D "$dir" -l "$DATA/postgres.log" -w -t "$START_TIMEOUT" start \
      -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$dir -c max_connections=400 -c shared_buffers=512MB" \
      >/dev/null || die_with_log postgres "pg_ctl start failed"
    head -n 1 "$dir/postmaster.pid" > "$DATA/postgres.pid"
  fi
  wait_healthy postgres health_postgres
  for db in quikapp ferretdb; do
    psql "$(pg_url postgres)" -tAc "SELECT 1 FROM pg_database WHERE datname='$db'" | grep -q 1 \
      || psql "$(pg_url postgres)" -qc "CREATE DATABASE $db" >/dev/null
  done
}

stop_postgres() {
  pid_alive postgres || return 0
  as_service_user "$(pg_bin)/pg_ctl" -D "$DATA/postgres" -m fast -w stop >/dev/null
  rm -f "$DATA/postgres.pid"
}

health_postgres() { psql "$(pg_url postgres)" -tAc 'SELECT 1' | grep -qx 1; }
version_postgres() { psql "$(pg_url postgres)" -tAc 'SHOW server_version' 2>/dev/null | cut -d' ' -f1; }
address_postgres() { pg_url; }

# ---------------------------------------------------------------------- Redis (Debian package)
install_redis() { command -v redis-server >/dev/null || apt_install redis-server; }

# Durable through its append-only file alone: snapshots besides it would fork and write the
# whole dataset every minute under load.
start_redis() {
  mkdir -p "$DATA/redis"
  pid_alive redis || redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$DATA/redis" \
    --daemonize yes --pidfile "$DATA/redis.pid" --logfile "$DATA/redis.log" --appendonly yes --save ""
  wait_healthy redis health_redis
}
stop_redis() { stop_pid redis; }
health_redis() { [ "$(redis-cli -p "$REDIS_PORT" PING)" = PONG ]; }
version_redis() { redis-cli -p "$REDIS_PORT" INFO server 2>/dev/null | tr -d '\r' | sed -n 's/^redis_version://p'; }
address_redis() { echo "redis://127.0.0.1:$REDIS_PORT"; }

# -------------------------------------------------------- Apache Kafka (Maven Central, KRaft)
KAFKA_HOME=$DIST/kafka-$KAFKA_VERSION

# The Kafka command-line tools' JVM; an array, so a tool can also be started as a background
# process of its own (whose PID is then $!).
KAFKA_JAVA=(java -Xms128m -Xmx256m -cp "$KAFKA_HOME/libs/*" -Dlog4j2.configurationFile="$KAFKA_HOME/log4j2-tools.properties")
kafka_java() { "${KAFKA_JAVA[@]}" "$@"; } # main-class args...

install_kafka() {
  [ -f "$KAFKA_HOME/.complete" ] && return 0
  log "fetching Apache Kafka $KAFKA_VERSION jars from Maven Central"
  mkdir -p "$KAFKA_HOME/libs"
  mvn -q -B -f "$INFRA_DIR/kafka/pom.xml" -Dkafka.version="$KAFKA_VERSION" \
    dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$KAFKA_HOME/libs"
  cp "$INFRA_DIR/kafka/log4j2.properties" "$INFRA_DIR/kafka/log4j2-tools.properties" "$KAFKA_HOME/"
  touch "$KAFKA_HOME/.complete"
}

start_kafka() {
  local dir=$DATA/kafka
  mkdir -p "$dir"
  sed -e "s|@KAFKA_PORT@|$KAFKA_PORT|g; s|@CONTROLLER_PORT@|$KAFKA_CONTROLLER_PORT|g; s|@LOG_DIR@|$dir/log|g" \
    "$INFRA_DIR/kafka/server.properties" > "$dir/server.properties"
  if [ ! -f "$dir/log/meta.properties" ]; then
    kafka_java kafka.tools.StorageTool format --standalone -t "$(kafka_java kafka.tools.StorageTool random-uuid)" \
      -c "$dir/server.properties" > "$DATA/kafka.log" 2>&1 || die_with_log kafka "storage format failed"
  fi
  if ! pid_alive kafka; then
    KAFKA_LOG=$DATA/kafka.log nohup java -Xms1g -Xmx1g -XX:+UseG1GC -cp "$KAFKA_HOME/libs/*" \
      -Dlog4j2.configurationFile="$KAFKA_HOME/log4j2.properties" -Dkafka.log.file="$DATA/kafka.log" \
      kafka.Kafka "$dir/server.properties" >> "$DATA/kafka.log" 2>&1 &
    echo $! > "$DATA/kafka.pid"
  fi
  wait_healthy kafka kafka_listening
  local existing; existing=$(kafka_topics --list) || die_with_log kafka "cannot list topics"
  for topic in $KAFKA_TOPICS quikapp.healthcheck; do
    grep -qx "$topic" <<<"$existing" || kafka_topics --create --if-not-exists --topic "$topic" \
      --partitions "$KAFKA_PARTITIONS" --replication-factor 1 >/dev/null
  done
  wait_healthy kafka health_kafka
}

kafka_topics() { kafka_java org.apache.kafka.tools.TopicCommand --bootstrap-server "127.0.0.1:$KAFKA_PORT" "$@"; }
kafka_listening() { (exec 3<>"/dev/tcp/127.0.0.1/$KAFKA_PORT") 2>/dev/null; }
stop_kafka() { stop_pid kafka; }

# A real round trip: produce a unique record, then read it back in a consumer group. The group
# starts from its committed offset, so it reads only the records of recent checks; the consumer
# is stopped (and commits) as soon as the record shows up, within a bound.
health_kafka() {
  local token out pid
  token=health-$(date +%s%N)
  echo "$token" | kafka_java org.apache.kafka.tools.ConsoleProducer --bootstrap-server "127.0.0.1:$KAFKA_PORT" \
    --topic quikapp.healthcheck >/dev/null 2>&1 || return 1
  out=$(mktemp)
  "${KAFKA_JAVA[@]}" org.apache.kafka.tools.consumer.ConsoleConsumer --bootstrap-server "127.0.0.1:$KAFKA_PORT" \
    --topic quikapp.healthcheck --group quikapp-healthcheck --from-beginning --timeout-ms 30000 > "$out" 2>/dev/null &
  pid=$!
  while kill -0 "$pid" 2>/dev/null && ! grep -qx "$token" "$out"; do sleep 0.2; done
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  grep -qx "$token" "$out"; local found=$?
  rm -f "$out"
  return $found
}
version_kafka() { echo "$KAFKA_VERSION"; }
address_kafka() { echo "127.0.0.1:$KAFKA_PORT"; }

# ------------------------------------- OpenSearch (integ-test distribution from Maven Central)
OPENSEARCH_HOME=$DIST/opensearch-$OPENSEARCH_VERSION

install_opensearch() {
  if [ ! -f "$OPENSEARCH_HOME/.complete" ]; then
    log "fetching OpenSearch $OPENSEARCH_VERSION from Maven Central"
    local zip=org.opensearch.distribution.integ-test-zip:opensearch:$OPENSEARCH_VERSION:zip
    mvn -q -B dependency:copy -Dartifact="$zip" -DoutputDirectory="$DIST" -Dmdep.overWriteIfNewer=true
    rm -rf "$OPENSEARCH_HOME"
    (cd "$DIST" && unzip -q "opensearch-$OPENSEARCH_VERSION.zip" && rm "opensearch-$OPENSEARCH_VERSION.zip")
    touch "$OPENSEARCH_HOME/.complete"
  fi
  # The integ-test distribution has no analysis module; the search model's analyzer needs
  # analysis-common (asciifolding, porter_stem), which Maven Central serves as a bare jar.
  local module=$OPENSEARCH_HOME/modules/analysis-common
  [ -f "$OPENSEARCH_HOME/.analysis-common" ] && return 0
  log "fetching OpenSearch's analysis-common module $OPENSEARCH_VERSION from Maven Central"
  rm -rf "$module" && mkdir -p "$module"
  mvn -q -B dependency:copy -Dartifact="org.opensearch.plugin:analysis-common:$OPENSEARCH_VERSION" \
    -DoutputDirectory="$module"
  cat > "$module/plugin-descriptor.properties" <<PROPS
description=Adds "built in" analyzers to OpenSearch.
version=$OPENSEARCH_VERSION
name=analysis-common
classname=org.opensearch.analysis.common.CommonAnalysisPlugin
java.version=11
opensearch.version=$OPENSEARCH_VERSION
custom.foldername=
extended.plugins=
has.native.controller=false
PROPS
  touch "$OPENSEARCH_HOME/.analysis-common"
}

start_opensearch() {
  local dir=$DATA/opensearch
  mkdir -p "$dir/data" "$dir/logs" "$dir/config"
  cp -r "$OPENSEARCH_HOME/config/." "$dir/config/"
  # jvm.options names its log and dump files relative to the (read-only) install folder.
  sed -i -e "s|logs/|$dir/logs/|g" -e "s|HeapDumpPath=data|HeapDumpPath=$dir/data|" "$dir/config/jvm.options"
  cat > "$dir/config/opensearch.yml" <<YML
cluster.name: quikapp-local
node.name: quikapp-local-1
path.data: $dir/data
path.logs: $dir/logs
network.host: 127.0.0.1
http.port: $OPENSEARCH_PORT
transport.port: $OPENSEARCH_TRANSPORT_PORT
discovery.type: single-node
action.auto_create_index: true
cluster.routing.allocation.disk.threshold_enabled: false
YML
  [ "$(id -u)" = 0 ] && chown -R "$SERVICE_USER" "$dir"
  # A node started before its analysis module was installed: start it again.
  if pid_alive opensearch && [ "$OPENSEARCH_HOME/.analysis-common" -nt "$DATA/opensearch.pid" ]; then
    stop_opensearch
  fi
  if ! pid_alive opensearch; then
    : > "$DATA/opensearch.log"; [ "$(id -u)" = 0 ] && chown "$SERVICE_USER" "$DATA/opensearch.log"
    rm -f "$dir/opensearch.pid" # a killed node leaves it behind; wait for the new one below
    (as_service_user env OPENSEARCH_JAVA_HOME="$(java_home)" OPENSEARCH_PATH_CONF="$dir/config" \
      OPENSEARCH_JAVA_OPTS="-Xms1g -Xmx1g" \
      "$OPENSEARCH_HOME/bin/opensearch" -d -p "$dir/opensearch.pid" >> "$DATA/opensearch.log" 2>&1 \
      ) || die_with_log opensearch "launcher failed"
    for _ in $(seq 1 40); do [ -s "$dir/opensearch.pid" ] && break; sleep 0.25; done
    cp "$dir/opensearch.pid" "$DATA/opensearch.pid" 2>/dev/null || die_with_log opensearch "no pid file"
  fi
  wait_healthy opensearch health_opensearch
}
stop_opensearch() { stop_pid opensearch; }
health_opensearch() { health_opensearch_cluster && analysis_opensearch; }
health_opensearch_cluster() {
  curl -fsS "http://127.0.0.1:$OPENSEARCH_PORT/_cluster/health?timeout=5s" | grep -Eq '"status":"(green|yellow)"'
}
# The analyzer the search model uses, round trip.
analysis_opensearch() {
  curl -fsS -H 'content-type: application/json' "http://127.0.0.1:$OPENSEARCH_PORT/_analyze" \
    -d '{"tokenizer":"standard","filter":["lowercase","asciifolding","porter_stem"],"text":"Héllo replies"}' \
    | grep -q '"token":"repli"'
}
version_opensearch() { curl -fsS "http://127.0.0.1:$OPENSEARCH_PORT/" 2>/dev/null | sed -n 's/.*"number" : "\([^"]*\)".*/\1/p'; }
address_opensearch() { echo "http://127.0.0.1:$OPENSEARCH_PORT"; }

# ----------------------------------------------- FerretDB (Go module proxy, backed by PostgreSQL)
FERRETDB_BIN=$DIST/ferretdb-$FERRETDB_VERSION/ferretdb
VENV=$DIST/venv

install_ferretdb() {
  if [ ! -x "$FERRETDB_BIN" ]; then
    log "building FerretDB $FERRETDB_VERSION from the Go module proxy"
    (cd "$INFRA_DIR/ferretdb" && go build -o "$FERRETDB_BIN" .)
  fi
  # pymongo gives the health check a real MongoDB-protocol client.
  if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import pymongo' 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q pymongo
  fi
}

start_ferretdb() {
  if ! pid_alive ferretdb; then
    mkdir -p "$DATA/ferretdb"
    nohup "$FERRETDB_BIN" -handler=postgresql -postgresql-url="$(pg_url ferretdb)" \
      -listen-addr="127.0.0.1:$FERRETDB_PORT" > "$DATA/ferretdb.log" 2>&1 &
    echo $! > "$DATA/ferretdb.pid"
  fi
  wait_healthy ferretdb health_ferretdb
}
stop_ferretdb() { stop_pid ferretdb; }
health_ferretdb() {
  "$VENV/bin/python" - "$FERRETDB_PORT" <<'PY'
import sys, time, pymongo
client = pymongo.MongoClient(f"mongodb://127.0.0.1:{sys.argv[1]}/", serverSelectionTimeoutMS=3000)
client.admin.command("ping")
probe = client["quikapp_health"]["probe"]
token = f"health-{time.time_ns()}"
probe.insert_one({"_id": token})
assert probe.find_one({"_id": token}) is not None
probe.delete_one({"_id": token})
PY
}
version_ferretdb() { "$FERRETDB_BIN" -version | sed -n 's/^version: *//p'; }
address_ferretdb() { echo "mongodb://127.0.0.1:$FERRETDB_PORT/"; }

# The URLs the project reads, for tests and for `eval "$(infra/local/status --env)"`.
print_env() {
  echo "export QUIKAPP_POSTGRES_URL=$(pg_url)"
  echo "export QUIKAPP_REDIS_URL=$(address_redis)"
  echo "export QUIKAPP_KAFKA_BROKERS=$(address_kafka)"
  echo "export QUIKAPP_ELASTICSEARCH_URL=$(address_opensearch)"
  echo "export QUIKAPP_MONGO_URL=$(address_ferretdb)"
}
