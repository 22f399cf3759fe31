-- A second database for MLflow's users and permissions (the basic-auth app), next to the
-- tracking database that POSTGRES_DB creates. Runs once, on an empty data directory.
CREATE DATABASE mlflow_auth OWNER mlflow;
