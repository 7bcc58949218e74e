# clusterfeed as a container: config and data live in volumes, the service runs as a
# non-root user. Build: docker build -t clusterfeed .
# Run:  docker run -v $PWD/config:/config -v clusterfeed-data:/data clusterfeed
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    CLUSTERFEED_CONFIG=/config/clusterfeed.toml

WORKDIR /app
COPY pyproject.toml README.md CHANGELOG.md ./
COPY src ./src
COPY templates ./templates
RUN pip install ".[postgres]" \
 && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin clusterfeed \
 && mkdir -p /config /data \
 && chown clusterfeed /data

# /config holds clusterfeed.toml (and templates, subscriber CSV, if you use your own);
# point store.url, publish.output_dir and mail.maildir at /data in it.
VOLUME ["/config", "/data"]
USER clusterfeed
WORKDIR /data

# Healthy when the config loads, the store opens and a feed was fetched in the last
# two hours (a fetch interval longer than that needs a larger --max-age).
HEALTHCHECK --interval=5m --timeout=30s --start-period=10m \
  CMD ["clusterfeed", "status", "--max-age", "120"]

# The scheduler and the web server (feeds, /healthz, /metrics) in one process; set
# [web] host = "0.0.0.0" in the config so the port is reachable from outside.
EXPOSE 8080
CMD ["clusterfeed", "run", "--serve"]
