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

COPY *.py ./
COPY apis/ ./apis/

USER 10001
VOLUME ["/data"]
EXPOSE 8000
CMD ["gunicorn", "-c", "gunicorn.conf.py", "server:create_app()"]
