# Kamailio (Debian bookworm's 5.6) for docker/compose.yaml: the project publishes no image we can
# pin to the Debian package the config is tested with (tests/test_kamailio.py), so it is built
# here. The config and the destination list are mounted (compose.yaml). netbase: /etc/protocols,
# without which Kamailio logs "could not get TCP protocol number" at start.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN set -eu; apt-get update -q; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends kamailio netbase; \
    rm -rf /var/lib/apt/lists/*; mkdir -p /run/kamailio
ENTRYPOINT ["kamailio"]
CMD ["-f", "/etc/kamailio/kamailio.cfg", "-DD", "-E", "-Y", "/run/kamailio", "-m", "64", "-M", "8"]
