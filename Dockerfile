FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    CACHE_DB_PATH=/data/code_model_cache.sqlite3

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt \
    && useradd --system --uid 10001 --home-dir /app cache \
    && mkdir -p /data \
    && chown cache:cache /data

# Every file the app needs, by name, one a line: a package goes in as its directory
# (COPY apis/ ./apis/). tests/test_docker_image.py starts the CMD from exactly these files and
# names any file of the repository that is neither copied here nor in .dockerignore.
COPY \
    access_log.py \
    cache_policy.py \
    cache_store.py \
    cli.py \
    coalesce.py \
    config.py \
    dashboard.html \
    dashboard.py \
    errors.py \
    fast_lane.py \
    guard.py \
    gunicorn.conf.py \
    images.py \
    key_partition.py \
    metrics.py \
    near_match.py \
    previews.py \
    pricing.py \
    proxy.py \
    recent_items.py \
    secret_scan.py \
    server.py \
    store_browsing.py \
    store_errors.py \
    store_maintenance.py \
    store_schema.py \
    streaming.py \
    upstream.py \
    wire.py \
    ./
COPY stores/ ./stores/
COPY apis/ ./apis/

USER 10001
VOLUME ["/data"]
EXPOSE 8000
CMD ["gunicorn", "-c", "gunicorn.conf.py", "server:create_app()"]
