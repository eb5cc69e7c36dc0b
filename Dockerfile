# nbgateway container image.
#
#   docker build -t nbgateway .
#   docker run --rm --env-file .env -p 127.0.0.1:8080:8080 -v nbgw-data:/data \
#       --ulimit nofile=65536:65536 nbgateway
#
# An image cannot set its own open-files limit: pass --ulimit (docker-compose.yml sets
# `ulimits`); the gateway raises its soft limit to the hard one at start. See
# docs/deployment.md ("File descriptors").

# ---- build stage: install the package and its dependencies into a virtualenv ----------
FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY nbgateway/ ./nbgateway/
RUN pip install --no-cache-dir '.[fast]'

# ---- runtime stage: the virtualenv only, run as an unprivileged user -------------------
FROM python:3.11-slim

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NBGW_DATABASE=/data/nbgateway.db \
    NBGW_LISTEN=0.0.0.0:8080

RUN groupadd --system --gid 10001 nbgw \
 && useradd --system --uid 10001 --gid nbgw --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin nbgw \
 && mkdir -p /data \
 && chown nbgw:nbgw /data

COPY --from=build /opt/venv /opt/venv

# The SQLite database (and its -wal/-shm files) lives here. A named volume mounted on an
# empty /data inherits the nbgw ownership set above.
VOLUME ["/data"]
WORKDIR /data
USER 10001:10001

EXPOSE 8080

# The slim image has no curl, so probe with the standard library. /healthz answers 200
# while the process is up; readiness (database, key) is /readyz.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["nbgateway"]
CMD ["serve"]
