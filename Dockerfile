# relayd's container image: a relay (the default command) or an agent.
#
#   docker build -t relayd .
#   docker run -d --name relayd -p 7000:7000 -v relayd-data:/var/lib/relayd relayd
#
# Two stages. "build" has the compiler and Python headers: it compiles the
# Cython hot path (a compile error fails the build; there is no fallback to
# the pure twins) and installs relayd with the exact versions of
# requirements.lock into a virtual environment. The runtime stage is Debian's
# python3 and that environment, minus what only building needs (pip,
# setuptools, wheel; Cython stays: the pure twins import its `cython` shadow
# module), run as an unprivileged user. tests/ops/test_container.py builds
# this file unchanged and carries traffic through it.

FROM debian:bookworm-slim AS build
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev python3 python3-dev python3-venv \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CONSTRAINT=/src/requirements.lock
WORKDIR /src
# The build tools and the dependencies first: a layer that only the lock file invalidates.
COPY requirements.lock pyproject.toml ./
RUN python3 -m venv /opt/relayd \
 && /opt/relayd/bin/pip install -q pip setuptools wheel cython \
 && /opt/relayd/bin/python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > deps.txt \
 && /opt/relayd/bin/pip install -q -r deps.txt
COPY setup.py README.md ./
COPY _ext ./_ext
COPY relayd ./relayd
# The extensions compile in parallel (build_ext's own -j, given through
# distutils' extra config file) and without debug info (stripped anyway).
RUN printf '[build_ext]\nparallel = %s\n' "$(nproc)" > /tmp/build_ext.cfg \
 && DIST_EXTRA_CONFIG=/tmp/build_ext.cfg CFLAGS=-g0 /opt/relayd/bin/pip install -q --no-build-isolation --no-deps . \
 && /opt/relayd/bin/relayd version \
 && /opt/relayd/bin/pip uninstall -q -y setuptools wheel pip \
 && find /opt/relayd -name '*.so' -exec strip --strip-debug {} +

FROM debian:bookworm-slim
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log \
 && useradd --uid 10001 --user-group --home-dir /var/lib/relayd --no-create-home --shell /usr/sbin/nologin relayd \
 && install -d -o relayd -g relayd -m 0700 /var/lib/relayd
COPY --from=build /opt/relayd /opt/relayd
ENV PATH=/opt/relayd/bin:$PATH PYTHONUNBUFFERED=1 RELAYD_HEALTH_URL=http://127.0.0.1:9100/healthz
USER relayd
WORKDIR /var/lib/relayd
VOLUME /var/lib/relayd
# 7000: agents (TLS); 9100: Prometheus /metrics and /healthz. Public
# endpoints (--tcp, --https) are whatever the command names.
EXPOSE 7000 9100
# /healthz on the metrics listener: 200 while the relay serves. An agent has
# no such listener: run agent containers with --no-healthcheck (see README).
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python3", "-m", "relayd.healthcheck"]
ENTRYPOINT ["relayd"]
CMD ["serve", "--data", "/var/lib/relayd", "--agents", "0.0.0.0:7000", "--metrics", "0.0.0.0:9100"]
