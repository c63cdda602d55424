#!/bin/bash
# Runs once, on the first start of an empty data directory (the postgres image's /docker-entrypoint-initdb.d):
# one owner role and one database per client, so MLflow and Feast cannot read each other's tables.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
  -v mlflow_pw="$MLFLOW_DB_PASSWORD" -v feast_pw="$FEAST_DB_PASSWORD" <<'SQL'
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_pw';
CREATE DATABASE mlflow OWNER mlflow;
CREATE ROLE feast LOGIN PASSWORD :'feast_pw';
CREATE DATABASE feast OWNER feast;
SQL
