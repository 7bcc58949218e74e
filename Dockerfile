# clusterfeed as a container: config and data live in volumes, the service runs as a
# non-root user. Build and run (docs/operations.md, "Docker", says more):
#   docker build -t clusterfeed .
#   docker run -d --name clusterfeed -p 8080:8080 -v clusterfeed-config:/config -v clusterfeed-data:/data clusterfeed
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    CLUSTERFEED_CONFIG=/config/clusterfeed.toml \
    CLUSTERFEED_DATA=/data

WORKDIR /app
COPY pyproject.toml README.md CHANGELOG.md ./
COPY src ./src
COPY templates ./templates
# The example feeds and subscribers go into the package, for `clusterfeed init`.
COPY config ./config
COPY scripts/docker-entrypoint /usr/local/bin/clusterfeed-entrypoint
RUN pip install ".[postgres,workers]" \
 && chmod 755 /usr/local/bin/clusterfeed-entrypoint \
 && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin clusterfeed \
 && mkdir -p /config /data \
 && chown clusterfeed /config /data

# /config holds clusterfeed.toml (and templates, subscriber CSV, ...). When it has none
# on the first start, the entry point writes a starter config there with the example
# feeds (`clusterfeed init /config --data /data`). Database, published files and mail
# belong in /data.
VOLUME ["/config", "/data"]
USER clusterfeed
WORKDIR /data

# Healthy when the config loads, the store opens and a feed was fetched in the last
# two hours (a fetch interval longer than that needs a larger --max-age).
HEALTHCHECK --interval=5m --timeout=30s --start-period=10m \
  CMD ["clusterfeed", "status", "--max-age", "120"]

# The scheduler and the web server (news page, feeds, /healthz, /metrics) in one
# process, listening on all of the container's addresses at port 8080 whatever the
# config's web.host and web.port say: only that way is it reachable through -p.
EXPOSE 8080
ENTRYPOINT ["clusterfeed-entrypoint"]
CMD ["clusterfeed", "run", "--serve", "--host", "0.0.0.0", "--port", "8080"]
