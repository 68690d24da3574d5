#!/usr/bin/env bash
# Runs the README's test command (softhsm-tests/run-all.sh) on a clean clone of this
# checkout's HEAD inside a minimal Debian bookworm root (debootstrap --variant=minbase) that
# has nothing but Rust (this machine's rustup toolchains, bound read-only) and gcc: proof
# that the install script installs every program the tests, the scripts and the README
# walk-through call. Needs root (debootstrap, chroot, mounts) and network access to Debian,
# crates.io and npm. Takes as long as the suite plus the first build.
#
#   softhsm-tests/fresh-debian.sh [DIR]     (default /var/tmp/keygate-fresh-debian)
#
# DIR/base, the minimal root, is made once and kept as it is; each run copies it to
# DIR/run, so every run starts from the same fresh root. The host's own extra CA
# certificates (/usr/local/share/ca-certificates, e.g. an egress proxy's) are added to the
# copy, as they would be on any machine of this network. Environment: KEYGATE_FUZZ_SECONDS and
# KEYGATE_SCHEMATHESIS_EXAMPLES pass through (shorter runs).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-/var/tmp/keygate-fresh-debian}
base=$dir/base
root=$dir/run
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
[ "$(id -u)" -eq 0 ] || { echo "fresh-debian.sh: run as root" >&2; exit 1; }
command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
cargo_bin=${CARGO_HOME:-$HOME/.cargo}/bin
[ -d "$rustup_home/toolchains" ] || { echo "fresh-debian.sh: no rustup toolchains in $rustup_home" >&2; exit 1; }

if [ ! -e "$base/.keygate-base-ready" ]; then
  rm -rf "$base"
  debootstrap --variant=minbase bookworm "$base" "$mirror"
  cp /etc/resolv.conf "$base/etc/resolv.conf"
  # Rust needs a C toolchain to link, and the clone needs git: "Rust and gcc and nothing
  # else" (ca-certificates: Debian's CA list, which HTTPS needs anywhere)
  chroot "$base" apt-get update -qq
  chroot "$base" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    gcc libc6-dev ca-certificates git >/dev/null
  touch "$base/.keygate-base-ready"
fi
rm -rf "$root"
cp -a "$base" "$root"
cp /etc/resolv.conf "$root/etc/resolv.conf"
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates >/dev/null 2>&1
fi
ca=/etc/ssl/certs/ca-certificates.crt

mounts=()
bind() { mkdir -p "$root$2"; mount --bind "$1" "$root$2"; mounts=("$root$2" "${mounts[@]}"); }
cleanup() {
  for m in "${mounts[@]}"; do umount -l "$m" 2>/dev/null || true; done
}
trap cleanup EXIT
mkdir -p "$root/proc" "$root/sys" "$root/dev"
mount -t proc proc "$root/proc"; mounts=("$root/proc" "${mounts[@]}")
bind /sys /sys
bind /dev /dev
bind /dev/pts /dev/pts
mkdir -p "$root/dev/shm" && mount -t tmpfs shm "$root/dev/shm" && mounts=("$root/dev/shm" "${mounts[@]}")
bind "$rustup_home" /opt/rustup
bind "$cargo_bin" /opt/cargo-bin

rm -rf "$root/src/keygate"
mkdir -p "$root/src"
git clone -q "$repo" "$root/src/keygate"
chroot "$root" env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
  PATH=/root/.cargo/bin:/opt/cargo-bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  RUSTUP_HOME=/opt/rustup CARGO_HOME=/root/.cargo \
  SSL_CERT_FILE=$ca NODE_EXTRA_CA_CERTS=$ca PIP_CERT=$ca REQUESTS_CA_BUNDLE=$ca CURL_CA_BUNDLE=$ca \
  ${KEYGATE_FUZZ_SECONDS:+KEYGATE_FUZZ_SECONDS=$KEYGATE_FUZZ_SECONDS} \
  ${KEYGATE_SCHEMATHESIS_EXAMPLES:+KEYGATE_SCHEMATHESIS_EXAMPLES=$KEYGATE_SCHEMATHESIS_EXAMPLES} \
  bash -c 'cd /src/keygate && timeout 3h softhsm-tests/run-all.sh'
echo "fresh-debian.sh: the test command passed in a minimal Debian bookworm root ($root)" >&2
