#!/usr/bin/env bash
# Installs the independent OIDC client (openid-client, jose; versions pinned by
# package-lock.json) into DEST (default target/oidc-client), once per lock file.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="${1:-$here/../../target/oidc-client}"
mkdir -p "$dest"
cp "$here/verify.mjs" "$dest/"
if [ -d "$dest/node_modules" ] && cmp -s "$here/package-lock.json" "$dest/package-lock.json"; then
  exit 0
fi
cp "$here/package.json" "$here/package-lock.json" "$dest/"
cd "$dest"
npm ci --no-audit --no-fund --loglevel=error >/dev/null
