#!/usr/bin/env bash
# Checks that the runtime stage of the container file installs every shared library the
# keygate binary needs:
#   deploy/container/check-runtime-libs.sh BINARY [CONTAINERFILE]
# CONTAINERFILE defaults to the Containerfile beside this script.
#
# Run it on a Debian bookworm machine (the release of both stages), against a binary built
# there, for example target/release/keygate. It
#   1. runs `ldd BINARY` and fails on any library reported "not found";
#   2. adds the modules that libtss2-tctildr opens by name at run time (the TPM transports
#      the image promises: device, swtpm, mssim), which ldd cannot see;
#   3. maps every library to the Debian package that ships it with `dpkg -S` (trying the
#      /lib and /usr/lib spellings of the path, and the file a symlink points to: bookworm
#      has a merged /usr, but dpkg records each file under the path its package used);
#   4. reads the packages that the last stage (after the last FROM) installs with apt-get;
#   5. exits 1 naming each library whose package is neither installed there nor already in
#      the base image.
#
# The base image is debian:bookworm-slim; its packages are listed below (from the image's
# rootfs.manifest published by debuerreotype, which builds the official Debian images).
# Package priorities cannot stand in for that list: bookworm marks libc6 and the other
# libraries "optional". To check against another base, or a newer manifest, put its
# package names in a file, one per line, and set BASE_PACKAGES_FILE, e.g. from
#   docker run --rm debian:bookworm-slim dpkg-query -W -f '${Package}\n'
#
# Exit status: 0 all present, 1 something missing or unmappable, 2 usage error.
set -euo pipefail

usage() {
  echo "usage: $0 BINARY [CONTAINERFILE]" >&2
  exit 2
}
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  usage
fi
binary=$1
containerfile=${2:-$(dirname "$0")/Containerfile}
[ -f "$binary" ] || { echo "check-runtime-libs: no such binary: $binary" >&2; exit 2; }
[ -f "$containerfile" ] || { echo "check-runtime-libs: no such file: $containerfile" >&2; exit 2; }
for tool in ldd dpkg awk; do
  command -v "$tool" >/dev/null || { echo "check-runtime-libs: needs $tool (a Debian machine)" >&2; exit 2; }
done

# debian:bookworm-slim (debuerreotype bookworm/slim/rootfs.manifest), architecture
# qualifiers dropped.
base_packages="adduser apt base-files base-passwd bash bsdutils coreutils dash debconf
debian-archive-keyring debianutils diffutils dpkg e2fsprogs findutils gcc-12-base gpgv grep
gzip hostname init-system-helpers libacl1 libapt-pkg6.0 libattr1 libaudit-common libaudit1
libblkid1 libbz2-1.0 libc-bin libc6 libcap-ng0 libcap2 libcom-err2 libcrypt1 libdb5.3
libdebconfclient0 libext2fs2 libffi8 libgcc-s1 libgcrypt20 libgmp10 libgnutls30
libgpg-error0 libhogweed6 libidn2-0 liblz4-1 liblzma5 libmd0 libmount1 libnettle8
libp11-kit0 libpam-modules libpam-modules-bin libpam-runtime libpam0g libpcre2-8-0
libseccomp2 libselinux1 libsemanage-common libsemanage2 libsepol2 libsmartcols1 libss2
libstdc++6 libsystemd0 libtasn1-6 libtinfo6 libudev1 libunistring2 libuuid1 libxxhash0
libzstd1 login logsave mawk mount ncurses-base ncurses-bin passwd perl-base sed
sysvinit-utils tar tzdata usr-is-merged util-linux util-linux-extra zlib1g"
if [ -n "${BASE_PACKAGES_FILE:-}" ]; then
  base_packages=$(sed 's/:.*//' "$BASE_PACKAGES_FILE")
fi

# TPM transports libtss2-tctildr opens with dlopen("libtss2-tcti-<name>.so.0"); keep in
# step with the comment in the Containerfile.
tcti_modules="libtss2-tcti-device.so.0 libtss2-tcti-swtpm.so.0 libtss2-tcti-mssim.so.0"

fail=0
complain() {
  echo "check-runtime-libs: $*" >&2
  fail=1
}

# --- 1. what the binary loads --------------------------------------------------------
if ! ldd_out=$(ldd "$binary" 2>&1); then
  echo "check-runtime-libs: ldd $binary failed: $ldd_out" >&2
  exit 1
fi
while read -r soname; do
  complain "ldd: $soname => not found (install it on this machine first: the check maps libraries found here)"
done < <(awk '/=> not found/ { print $1 }' <<<"$ldd_out")

# "name => /path (addr)" and the loader's "/path (addr)"; linux-vdso has no file.
mapfile -t libs < <(awk '$2 == "=>" && $3 ~ /^\// { print $1 " " $3 } $1 ~ /^\// { print $1 " " $1 }' <<<"$ldd_out")

# --- 2. modules loaded by name at run time --------------------------------------------
tctildr_dir=
for entry in "${libs[@]}"; do
  case ${entry%% *} in
    libtss2-tctildr.so.*) tctildr_dir=$(dirname "${entry#* }") ;;
  esac
done
if [ -n "$tctildr_dir" ]; then
  for module in $tcti_modules; do
    found=
    for dir in "$tctildr_dir" "/usr${tctildr_dir#/usr}" "${tctildr_dir#/usr}"; do
      if [ -e "$dir/$module" ]; then
        found=$dir/$module
        break
      fi
    done
    if [ -n "$found" ]; then
      libs+=("$module $found")
    else
      complain "$module (opened at run time by libtss2-tctildr) is not on this machine, so its package cannot be looked up"
    fi
  done
fi

# --- 3. library -> package ------------------------------------------------------------
# The other spelling of a path under a merged /usr: /lib/x <-> /usr/lib/x (also lib64).
other_spelling() {
  case $1 in
    /usr/lib*) echo "${1#/usr}" ;;
    /lib*) echo "/usr$1" ;;
    *) echo "$1" ;;
  esac
}
# Prints the packages owning $1 (comma-separated in dpkg's answer), one per line.
package_of() {
  local path real candidate out
  path=$1
  real=$(readlink -f "$path" || echo "$path")
  for candidate in "$path" "$(other_spelling "$path")" "$real" "$(other_spelling "$real")"; do
    # "pkg1:amd64, pkg2: /path"; lines about diversions start with "diversion by".
    if out=$(dpkg -S "$candidate" 2>/dev/null | grep -v '^diversion by' | grep ": $candidate\$"); then
      sed 's/: \/.*//; s/, /\n/g' <<<"$out" | sed 's/:.*//' | sort -u
      return 0
    fi
  done
  return 1
}

# --- 4. what the runtime stage installs -----------------------------------------------
# Joins continuation lines, keeps the instructions after the last FROM, and prints the
# words after each `apt-get [options] install` / `apt install` up to the end of that
# command (&&, ;, |), leaving out options, version pins (=…) and architectures (:…).
runtime_packages=$(awk '
  { sub(/\r$/, "") }
  /^[[:space:]]*#/ { next }
  { line = line $0 }
  /\\$/ { sub(/\\$/, "", line); next }
  { print line; line = "" }
' "$containerfile" | awk '
  toupper($1) == "FROM" { n = 0; delete keep; next }
  { keep[++n] = $0 }
  END {
    for (i = 1; i <= n; i++) {
      text = keep[i]
      gsub(/&&|\|\||;|\|/, " ; ", text)
      m = split(text, w, /[[:space:]]+/)
      installing = 0
      for (j = 1; j <= m; j++) {
        if (w[j] == ";") { installing = 0; continue }
        if (installing) {
          if (w[j] ~ /^-/ || w[j] == "") continue
          p = w[j]; sub(/[=:].*/, "", p); print p
        } else if (w[j] == "apt-get" || w[j] == "apt") {
          k = j + 1
          while (k <= m && w[k] ~ /^-/) k++
          if (w[k] == "install") { installing = 1; j = k }
        }
      }
    }
  }
' | sort -u)
last_from=$(awk 'toupper($1) == "FROM" { f = $0 } END { print f }' "$containerfile")
case $last_from in
  *debian:bookworm-slim*) ;;
  *) [ -n "${BASE_PACKAGES_FILE:-}" ] ||
       echo "check-runtime-libs: warning: the runtime stage is \"$last_from\", not debian:bookworm-slim; set BASE_PACKAGES_FILE to its package list" >&2 ;;
esac

# --- 5. compare ------------------------------------------------------------------------
in_list() { grep -qxF -- "$1" <<<"$2"; }
base_list=$(tr -s '[:space:]' '\n' <<<"$base_packages")
for entry in "${libs[@]}"; do
  name=${entry%% *}
  path=${entry#* }
  if ! packages=$(package_of "$path"); then
    complain "$name ($path): no Debian package ships this file (dpkg -S found nothing)"
    continue
  fi
  verdict=
  for p in $packages; do
    if in_list "$p" "$runtime_packages"; then
      verdict="installed by the runtime stage ($p)"
    elif [ -z "$verdict" ] && in_list "$p" "$base_list"; then
      verdict="in the base image ($p)"
    fi
  done
  if [ -n "$verdict" ]; then
    printf '%-28s %s\n' "$name" "$verdict"
  else
    complain "$name ($path): package $(paste -sd, <<<"$packages") is not installed by the runtime stage of $containerfile nor part of its base image"
  fi
done

if [ "$fail" -ne 0 ]; then
  exit 1
fi
echo "check-runtime-libs: every library of $binary is provided by the runtime stage of $containerfile"
