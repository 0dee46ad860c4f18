# syntax=docker/dockerfile:1
#
# userproxy container image: `userproxy run` as a non-root user whose Python interpreter
# carries the file capabilities CAP_NET_BIND_SERVICE (to listen on Service ports below
# 1024) and CAP_NET_ADMIN (for --manage-addresses), and nothing else; a capability is
# effective only if the pod also adds it. See docs/deploy.md for how to build, load and run it.
#
#   docker build -t userproxy:0.1.0 .
#
# Checked with `hadolint Dockerfile` (tests/test_deploy.py); needs BuildKit (Docker >= 23
# uses it by default) for the bind mount of the builder's wheels.

# --- builder: a wheel of userproxy and wheels of its dependencies ------------------------
FROM python:3.11-slim-bookworm AS builder

WORKDIR /src
COPY pyproject.toml README.md ./
COPY userproxy ./userproxy
# Every dependency ships binary wheels for CPython 3.11 on glibc (amd64, arm64), so no
# compiler is needed here; this stage only exists to keep pip's build isolation, setuptools
# and the sources out of the final image.
RUN pip wheel --no-cache-dir --disable-pip-version-check --wheel-dir /wheels .

# --- final image ---------------------------------------------------------------------------
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Install the wheels straight from the builder stage (a bind mount: no wheel file is left in
# a layer), without network access, build tools or pip cache.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --disable-pip-version-check --no-index \
        --find-links=/wheels /wheels/userproxy-*.whl

# File capability on the real interpreter binary (python3 is a symlink to it). A non-root
# process loses the capabilities that Kubernetes "adds" when it executes a program, unless
# that program has file capabilities (Kubernetes sets no ambient capabilities), so this is
# what makes `capabilities: add: [NET_BIND_SERVICE, NET_ADMIN]` effective (NET_ADMIN for
# --manage-addresses, which puts the service IPs on a device over netlink). setcap comes from
# libcap2-bin, removed again in the same layer. Debian revisions of bookworm's libcap 2.66
# come and go from the mirror, so the upstream version is pinned and the revision is not.
RUN apt-get update \
    && apt-get install -y --no-install-recommends 'libcap2-bin=1:2.66-*' \
    && setcap cap_net_bind_service,cap_net_admin=+ep "$(readlink -f /usr/local/bin/python3)" \
    && getcap "$(readlink -f /usr/local/bin/python3)" \
    && apt-get purge -y --auto-remove libcap2-bin \
    && rm -rf /var/lib/apt/lists/*

# A fixed, numeric non-root identity (10256, after the health port) so that Kubernetes'
# runAsNonRoot can check it and runAsUser/fsGroup can name it.
RUN groupadd --system --gid 10256 userproxy \
    && useradd --system --uid 10256 --gid 10256 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin userproxy
USER 10256:10256

# The health server (/healthz, /livez). The metrics server listens on 127.0.0.1:10249 by
# default and is not published.
EXPOSE 10256

ENTRYPOINT ["userproxy"]
CMD ["run"]
