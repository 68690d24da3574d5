#!/usr/bin/env bash
# Installs, from Debian's packages, whatever keygate needs that this machine lacks:
# SoftHSM2 (the embedded development token and the test HSM), OpenSC (pkcs11-tool),
# openssl (independent checks in the tests), pkg-config, the swtpm TPM 2.0 simulator,
# tpm2-tools and libtss2-dev (for tss-esapi), PostgreSQL, what schemathesis and the
# fuzzers need (python3-venv, g++), promtool, and the small tools the scripts call (curl,
# jq, xxd, procps). Does nothing when all is there.
set -euo pipefail

need=()
[ -e /usr/lib/softhsm/libsofthsm2.so ] && command -v softhsm2-util >/dev/null || need+=(softhsm2)
command -v pkcs11-tool >/dev/null || need+=(opensc)
command -v openssl >/dev/null || need+=(openssl)
command -v pkg-config >/dev/null || need+=(pkg-config)
# TPM 2.0: the simulator and its tools, and the TSS library tss-esapi links against
command -v swtpm >/dev/null || need+=(swtpm)
command -v swtpm_setup >/dev/null || need+=(swtpm-tools)
command -v tpm2_getcap >/dev/null || need+=(tpm2-tools)
pkg-config --exists tss2-esys 2>/dev/null || need+=(libtss2-dev)
command -v cc >/dev/null || need+=(gcc)
# the README's walk-through shapes JSON with jq
command -v jq >/dev/null || need+=(jq)
# PostgreSQL: the tests start private throwaway clusters (initdb, pg_ctl) unless
# KEYGATE_TEST_PG_URL names a server; psql and pg_dump come with it
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then
  need+=(postgresql)
fi
command -v runuser >/dev/null || need+=(util-linux)
# schemathesis runs in a Python virtual environment; the tests talk to the server with curl
command -v curl >/dev/null || need+=(curl)
command -v python3 >/dev/null && python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3 python3-venv)
# cargo-fuzz's libFuzzer builds C++
command -v c++ >/dev/null || need+=(g++)
# promtool checks /metrics and the alert rules in deploy/; the enrollment script and the
# README walk-through use xxd; tests and scripts look at processes with procps' tools
command -v promtool >/dev/null || need+=(prometheus)
command -v xxd >/dev/null || need+=(xxd)
command -v ps >/dev/null && command -v pkill >/dev/null || need+=(procps)
# the independent OIDC relying party of the discovery test runs on Node.js (npm installs
# its pinned packages under target/)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi
echo "keygate: installing ${need[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
