#!/bin/bash
# Idempotent MinIO setup: the buckets, a policy limited to them and the platform's user (minio-auth LINGBOT_S3_*).
# Safe to re-run; it waits for MinIO to answer first.
set -euo pipefail
mc() { command mc --config-dir /tmp/mc "$@"; }  # the root filesystem is read-only
for attempt in $(seq 1 60); do
  if mc alias set platform "$MINIO_URL" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null 2>&1; then break; fi
  echo "waiting for MinIO at $MINIO_URL ($attempt/60)"
  sleep 5
done
mc admin info platform >/dev/null
for bucket in $BUCKETS; do
  mc mb --ignore-existing "platform/$bucket"
done
mc admin policy create platform lingbot-rw /setup/lingbot-rw.json
mc admin user add platform "$LINGBOT_S3_ACCESS_KEY" "$LINGBOT_S3_SECRET_KEY"
if ! mc admin user info platform "$LINGBOT_S3_ACCESS_KEY" | grep -q lingbot-rw; then
  mc admin policy attach platform lingbot-rw --user "$LINGBOT_S3_ACCESS_KEY"
fi
echo "MinIO ready: buckets $BUCKETS, user $LINGBOT_S3_ACCESS_KEY with policy lingbot-rw"
