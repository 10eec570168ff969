# One image for the three services: `orders command-service`, `orders query-service`, `orders projector`.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY orders ./orders
COPY command_service ./command_service
COPY query_service ./query_service
COPY projector ./projector
RUN pip install . && useradd --system --uid 10001 --no-create-home orders
USER orders
EXPOSE 50051 50052
ENTRYPOINT ["orders"]
