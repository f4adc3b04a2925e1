#!/usr/bin/env bash
# Make sure the PostgreSQL and RabbitMQ the tests use are up: start them if they are installed
# here and down, or say exactly what is missing and how to start it.
set -u
pg_host=${HPCFLEET_TEST_PG_HOST:-127.0.0.1}; pg_port=${HPCFLEET_TEST_PG_PORT:-5432}
mq_host=${HPCFLEET_TEST_MQ_HOST:-127.0.0.1}; mq_port=${HPCFLEET_TEST_MQ_PORT:-5672}

up() { timeout 1 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }

wait_for() {  # name host port seconds
  for _ in $(seq "$4"); do up "$2" "$3" && return 0; sleep 1; done
  return 1
}

if ! up "$pg_host" "$pg_port"; then
  echo "PostgreSQL is not answering on $pg_host:$pg_port; starting it" >&2
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  fi
  wait_for PostgreSQL "$pg_host" "$pg_port" 30 || {
    echo "PostgreSQL is missing: start it with 'pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) main start' (trust auth on $pg_host:$pg_port)" >&2
    exit 1
  }
fi

if ! up "$mq_host" "$mq_port"; then
  echo "RabbitMQ is not answering on $mq_host:$mq_port; starting it" >&2
  command -v rabbitmq-server >/dev/null && rabbitmq-server -detached || true
  wait_for RabbitMQ "$mq_host" "$mq_port" 60 || {
    echo "RabbitMQ is missing: start it with 'rabbitmq-server -detached' (guest/guest on $mq_host:$mq_port)" >&2
    exit 1
  }
fi
echo "PostgreSQL and RabbitMQ are up"
