# One image for the three services and the gateway: `orders command-service`, `orders query-service`,
# `orders projector`, `orders gateway`.
# BASE: any Debian-like image with python3 (3.11+) and its venv module, e.g. python:3.12-slim (the
# default) or one built from Debian's packages (tests/containers builds one with debootstrap).
ARG BASE=python:3.12-slim
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/orders/bin:$PATH
WORKDIR /app
# Exact versions first (requirements.lock, made by scripts/lock), so that a code change rebuilds only the
# last layers and every build installs the same dependencies.
COPY requirements.lock ./
RUN python3 -m venv /opt/orders && pip install --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY orders ./orders
COPY command_service ./command_service
COPY query_service ./query_service
COPY projector ./projector
RUN pip install --no-deps . && useradd --system --uid 10001 --no-create-home orders
USER orders
# CommandService, QueryService, AdminService; their metrics; the gateway (HTTP).
EXPOSE 50051 50052 50053 9101 9102 9103 8080
ENTRYPOINT ["orders"]
