#!/bin/sh
# swtpm-ekcert.sh STATEDIR CADIR rsa|ecc [CERTOUTDIR]
#
# Creates a swtpm TPM 2.0 state in STATEDIR whose EK certificates (RSA-2048 in
# NV 0x01c00002 and ECC NIST P-384 in NV 0x01c00016, both always created by
# swtpm_setup 0.7.x) plus a platform cert (NV 0x01c08000) are issued by a
# private swtpm-localca CA living in CADIR.  If CADIR has no CA yet, the CA
# (self-signed root + intermediate "issuer") is created on the fly.
# Nothing is read from or written to /etc or /var/lib; works unprivileged.
#
# rsa|ecc selects which EK the printed EK_* lines refer to ("ecc" also passes
# --ecc to swtpm_setup, which only affects the (not created) SPK type).
#
# Output (stdout, key=value):
#   ROOT_CA=<cadir>/swtpm-localca-rootca-cert.pem   (self-signed root, PEM)
#   INTERMEDIATE_CA=<cadir>/issuercert.pem          (issuer of the EK certs, PEM)
#   EK_CERT_DER=<certout>/ek-rsa2048.crt | ek-secp384r1.crt
#   EK_NV_INDEX=0x01c00002 | 0x01c00016
#   EK_PERSISTENT_HANDLE=0x81010001 | 0x81010016
#   EK_CREATEEK_ALG=rsa | ecc384            (tpm2_createek -G value)
set -eu

if [ $# -lt 3 ] || [ $# -gt 4 ]; then
    echo "usage: $0 STATEDIR CADIR rsa|ecc [CERTOUTDIR]" >&2
    exit 2
fi
KIND=$3
case "$KIND" in
    rsa) ECCFLAG=""; EKFILE=ek-rsa2048.crt; NV=0x01c00002; PH=0x81010001; GALG=rsa ;;
    ecc) ECCFLAG="--ecc"; EKFILE=ek-secp384r1.crt; NV=0x01c00016; PH=0x81010016; GALG=ecc384 ;;
    *) echo "third argument must be rsa or ecc" >&2; exit 2 ;;
esac

mkdir -p "$1" "$2"
STATEDIR=$(cd "$1" && pwd)
CADIR=$(cd "$2" && pwd)
CERTOUT=${4:-$STATEDIR/ekcerts}
mkdir -p "$CERTOUT"
CERTOUT=$(cd "$CERTOUT" && pwd)

LOCALCA=/usr/share/swtpm/swtpm-localca
[ -x "$LOCALCA" ] || LOCALCA=$(command -v swtpm_localca)

TMP=$(mktemp -d "${TMPDIR:-/tmp}/mkswtpm.XXXXXX")
trap 'rm -rf "$TMP"' EXIT INT TERM

# Config files for swtpm-localca (kept in CADIR; written atomically so that
# concurrent invocations sharing a CADIR never see a half-written file).
cat > "$TMP/localca.conf" <<EOF
statedir = $CADIR
signingkey = $CADIR/signkey.pem
issuercert = $CADIR/issuercert.pem
certserial = $CADIR/certserial
EOF
# The --platform-* options are mandatory for --create-platform-cert.
cat > "$TMP/localca.options" <<EOF
--platform-manufacturer TestPlatform
--platform-version 2.1
--platform-model swtpm
EOF
mv -f "$TMP/localca.conf" "$CADIR/swtpm-localca.conf"
mv -f "$TMP/localca.options" "$CADIR/swtpm-localca.options"

cat > "$TMP/swtpm_setup.conf" <<EOF
create_certs_tool = $LOCALCA
create_certs_tool_config = $CADIR/swtpm-localca.conf
create_certs_tool_options = $CADIR/swtpm-localca.options
active_pcr_banks = sha256
EOF

# shellcheck disable=SC2086
if ! swtpm_setup --tpm2 $ECCFLAG --create-ek-cert --create-platform-cert \
        --tpmstate "$STATEDIR" --config "$TMP/swtpm_setup.conf" \
        --write-ek-cert-files "$CERTOUT" --overwrite \
        --logfile "$TMP/setup.log" >/dev/null 2>&1; then
    cat "$TMP/setup.log" >&2 || true
    echo "swtpm_setup failed" >&2
    exit 1
fi

ROOT=$CADIR/swtpm-localca-rootca-cert.pem
INTER=$CADIR/issuercert.pem
EKDER=$CERTOUT/$EKFILE
for f in "$ROOT" "$INTER" "$EKDER"; do
    [ -s "$f" ] || { echo "missing $f" >&2; cat "$TMP/setup.log" >&2; exit 1; }
done

# Sanity check: EK cert chains to this CA.
openssl x509 -inform der -in "$EKDER" -out "$TMP/ek.pem"
openssl verify -CAfile "$ROOT" -untrusted "$INTER" "$TMP/ek.pem" >/dev/null

echo "ROOT_CA=$ROOT"
echo "INTERMEDIATE_CA=$INTER"
echo "EK_CERT_DER=$EKDER"
echo "EK_NV_INDEX=$NV"
echo "EK_PERSISTENT_HANDLE=$PH"
echo "EK_CREATEEK_ALG=$GALG"
