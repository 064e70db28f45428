# egressproxy: the proxy, its bundled config, and a non-root user; nothing else.
#
#   docker build -t egressproxy .
#   docker run --rm -e PG_HOST=your-db.pg.example.cloud -p 5432:5432 -p 6432:6432 -p 9091:9091 egressproxy
#
# On Fly.io, `fly deploy` builds it (see fly.toml and the README, "Deploy on Fly.io").
# The config is read from /etc/egressproxy/egressproxy.yaml; values such as
# ${PG_HOST} come from the environment (Fly secrets), so one image serves any
# database. To ship a different file, replace it at that path (for example
# with a [[files]] entry in fly.toml).

# -- build: install the project and its dependencies into a virtualenv ------
FROM python:3.12-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv

# A C compiler for the compiled relay (egressproxy/_relay.c; the slim image
# has Python's headers). Build stage only: the run stage gets the built venv.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# Only what `pip install .` needs (.dockerignore keeps out the rest).
WORKDIR /src
COPY pyproject.toml setup.cfg setup.py README.md ./
COPY egressproxy/ egressproxy/
COPY twisted/ twisted/
RUN /opt/venv/bin/pip install --no-cache-dir .
# The relay is optional for `pip install .` (no compiler: pure-Python data
# path), but this image has one: an image without the relay is a failed build.
RUN cd / && /opt/venv/bin/python -c "import egressproxy._relay"

# -- tunnel-build: the single-file egressproxy-tunnel, for consumer apps ------
# Not part of this image.  `docker build --target tunnel-build -t egressproxy-tunnel .`
# leaves the executable at /egressproxy-tunnel, for an app without Python:
#   COPY --from=egressproxy-tunnel /egressproxy-tunnel /usr/local/bin/egressproxy-tunnel
# (README, "Consumer apps").  PyInstaller bundles Python and the code into
# one file; built on Debian 12, it runs on glibc images with glibc 2.36 or
# newer (Debian 12+, Ubuntu 23.04+; not Alpine's musl).  PyInstaller needs
# objdump (binutils).
FROM python:3.11-slim-bookworm AS tunnel-build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends binutils \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.cfg setup.py README.md ./
COPY egressproxy/ egressproxy/
COPY twisted/ twisted/
RUN pip install --no-cache-dir ".[tunnel-binary]"
RUN pyinstaller --onefile --name egressproxy-tunnel --distpath / --workpath /tmp/pyinstaller \
        --specpath /tmp/pyinstaller --paths /src egressproxy/tunnel/__main__.py \
    && /egressproxy-tunnel --version

# -- run ----------------------------------------------------------------------
FROM python:3.12-slim

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    EGRESSPROXY_CONFIG=/etc/egressproxy/egressproxy.yaml

COPY --from=build /opt/venv /opt/venv

# Build Twisted's plugin cache (twisted/plugins/dropin.cache) now, as root.
# Otherwise twistd tries to write it at every start, and the unprivileged user
# cannot.
RUN python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

COPY egressproxy.example.yaml /etc/egressproxy/egressproxy.yaml

RUN useradd --system --no-create-home --shell /usr/sbin/nologin egressproxy
USER egressproxy

# Listeners (direct, pooled) and the metrics service. Admin (9901) stays on
# loopback inside the container.
EXPOSE 5432 6432 9091

# Foreground, logs and access log to stdout, no pidfile (the user cannot write
# one, and the container needs none). SIGTERM drains, SIGHUP reloads.
CMD ["twistd", "-n", "--pidfile=", "egressproxy", "--config", "/etc/egressproxy/egressproxy.yaml"]
