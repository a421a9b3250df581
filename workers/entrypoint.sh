#!/bin/sh
# Entrypoint of the graceq image: wait for the broker, then become the given command.
#
# The broker URL (GRACEQ_BROKER_URL, with the password) is read from the environment and never
# printed; only the host and port appear in messages. Waiting here, rather than letting Celery
# retry, gives one clear line when Redis is unreachable or the password is wrong.
set -eu

wait_for_broker() {
    python - <<'PY'
import os, sys, time
from urllib.parse import urlsplit

url = os.environ.get("GRACEQ_BROKER_URL", "")
if not url.startswith(("redis://", "rediss://")):
    sys.exit(0)
import redis

where = f"{urlsplit(url).hostname}:{urlsplit(url).port or 6379}"
deadline = time.time() + float(os.environ.get("GRACEQ_BROKER_WAIT", "120"))
while True:
    try:
        redis.Redis.from_url(url, socket_connect_timeout=3).ping()
        sys.exit(0)
    except redis.AuthenticationError:
        sys.exit(f"graceq-entrypoint: Redis at {where} refused the password (check REDIS_PASSWORD)")
    except redis.RedisError as exc:
        if time.time() > deadline:
            sys.exit(f"graceq-entrypoint: Redis at {where} unreachable: {type(exc).__name__}")
        time.sleep(1)
PY
}

if [ "${1:-}" = graceq ] && [ -n "${GRACEQ_BROKER_URL:-}" ]; then
    wait_for_broker
fi
exec "$@"
