-- the two databases of deploy/docker-compose.yml's PostgreSQL: Prefect's and MLflow's
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
