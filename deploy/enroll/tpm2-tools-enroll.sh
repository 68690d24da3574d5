#!/usr/bin/env bash
# Enrolls this machine with keygate using only stock tpm2-tools and curl (plus coreutils):
# the same protocol `keygate enroll` speaks (the HTTP contract, "Attestation-gated enrollment").
#
#   tpm2-tools-enroll.sh [-e rsa2048|p256|p384] [-o OUTDIR] SERVER_URL
#
#   -e  which EK, named as `keygate enroll --ek` names it: rsa2048 (RSA-2048, EK certificate
#       in NV 0x01c00002; the default), p256 (NIST P-256, NV 0x01c0000a) or p384 (NIST P-384,
#       the TCG high-range template, NV 0x01c00016). The older names rsa, ecc256 and ecc
#       (P-384) are still accepted.
#   -o  where to write `token` and `ak.priv` (both 0600), `certificate.pem` (AK certificate,
#       then the CA) and `ak.pub` (with ak.priv, loadable again under the EK); default: the
#       current folder
#   The TPM comes from TPM2TOOLS_TCTI (for example device:/dev/tpmrm0, or
#   swtpm:host=127.0.0.1,port=2321). The PCRs to quote are the ones the server's challenge
#   names (its [enroll] pcr_selection): there is no option for them here.
#
# Exit status 0 on success; otherwise one line on stderr naming the step that failed and,
# for a refusal, the server's problem detail.
set -euo pipefail

ek_kind=rsa2048
out=.
while getopts "e:o:h" opt; do
  case $opt in
    e) ek_kind=$OPTARG ;;
    o) out=$OPTARG ;;
    *) sed -n '2,20p' "$0" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -eq 1 ] || { echo "usage: $0 [-e rsa2048|p256|p384] [-o OUTDIR] SERVER_URL" >&2; exit 2; }
server=${1%/}
# like `keygate enroll --server`: host:port alone means http on loopback, https elsewhere
case $server in
  http://* | https://*) ;;
  localhost:* | 127.* | \[::1\]*) server=http://$server ;;
  *://*) echo "enroll: $server: the scheme must be http or https" >&2; exit 2 ;;
  *) server=https://$server ;;
esac

case $ek_kind in
  rsa2048 | rsa) ek_kind=rsa2048; ek_alg=rsa; ek_nv=0x01c00002; session_hash=sha256 ;;
  p384 | ecc) ek_kind=p384; ek_alg=ecc384; ek_nv=0x01c00016; session_hash=sha384 ;;
  p256 | ecc256) ek_kind=p256; ek_alg=ecc; ek_nv=0x01c0000a; session_hash=sha256 ;;
  *) echo "enroll: -e must be rsa2048, p256 or p384" >&2; exit 2 ;;
esac
# TCG EK Credential Profile 2.x: the high-range (SHA-384) EK's policy is
# PolicyOR(PolicyA_SHA384 = PolicySecret(endorsement), PolicyC_SHA384).
policy_a_sha384=8bbf2266537c171cb56e403c4dc1d4b64f432611dc386e6f532050c3278c930e143e8bb1133824ccb431053871c6db53
policy_c_sha384=d6032ce61f2fb3c240eb3cf6a33237ef2b6a16f4293c22b455e261cffd217ad5b4947c2d73e63005eed2dc2b3593d165

mkdir -p "$out"
out=$(cd "$out" && pwd)   # the steps below run in a folder of their own
work=$(mktemp -d)
trap 'tpm2_flushcontext -t >/dev/null 2>&1 || true; tpm2_flushcontext -s >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
cd "$work"

fail() { echo "enroll: $*" >&2; exit 1; }
# Without a resource manager (a bare /dev/tpm0, swtpm) transient objects must be flushed
# between commands; with one this does nothing.
flush() { tpm2_flushcontext -t >/dev/null 2>&1 || true; }
tpm() { "$@" >"$work/tool.log" 2>&1 || fail "$1 failed: $(tail -n 1 "$work/tool.log")"; flush; }
hex() { od -An -v -tx1 "$1" | tr -d ' \n'; }
unhex() { printf '%b' "$(sed 's/../\\x&/g')"; }
b64() { base64 -w0 "$1"; }
# One string field of a flat JSON answer (keygate's are compact, one line).
field() { sed -n "s/.*\"$1\":\"\\([^\"]*\\)\".*/\\1/p"; }
post() {
  local path=$1 body=$2 status
  status=$(curl -sS -o answer.json -w '%{http_code}' -H 'content-type: application/json' \
    --data-binary "$body" "$server$path") || fail "cannot reach $server"
  if [ "$status" != 200 ]; then
    fail "$path answered $status: $(field detail < answer.json)"
  fi
}

# 1. The EK (from the standard template, so it is the key the EK certificate names) and,
#    when the TPM has one, its certificate.
tpm tpm2_createek -G "$ek_alg" -c ek.ctx -u ek.pub -f tss
cert_field=""
if tpm2_nvread "$ek_nv" -o ek.nv >/dev/null 2>&1; then
  # Some TPMs pad the NV index: keep the DER certificate only.
  if openssl_out=$(command -v openssl) && [ -n "$openssl_out" ]; then
    openssl x509 -inform der -in ek.nv -outform der -out ek.der 2>/dev/null || cp ek.nv ek.der
  else
    cp ek.nv ek.der
  fi
  cert_field=",\"ek_certificate\":\"$(b64 ek.der)\""
fi
flush

# 2. An attestation key under the EK: restricted ECDSA P-256 signing key.
tpm tpm2_createak -C ek.ctx -c ak.ctx -G ecc -g sha256 -s ecdsa -u ak.pub -n ak.name -r ak.priv -f tss

# 3. The challenge.
post /v1/enroll/challenge "{\"ek_pub\":\"$(b64 ek.pub)\",\"ak_pub\":\"$(b64 ak.pub)\"$cert_field}"
id=$(field enrollment_id < answer.json)
field tpm2_tools_credential < answer.json | base64 -d > cred.blob
nonce=$(field nonce < answer.json | base64 -d | od -An -v -tx1 | tr -d ' \n')
selection=$(field pcr_selection < answer.json)
[ -n "$id" ] && [ -s cred.blob ] && [ -n "$nonce" ] && [ -n "$selection" ] ||
  fail "the challenge answer lacks a field"

# 4. ActivateCredential: only the TPM holding this EK recovers the secret, and only for this AK.
tpm tpm2_startauthsession --policy-session -g "$session_hash" -S session.ctx
tpm2_policysecret -S session.ctx -c e >tool.log 2>&1 || fail "tpm2_policysecret failed: $(tail -n 1 tool.log)"
if [ "$ek_kind" = p384 ]; then
  printf '%s' "$policy_a_sha384" | unhex > policy_a
  printf '%s' "$policy_c_sha384" | unhex > policy_c
  tpm2_policyor -S session.ctx -l "sha384:policy_a,policy_c" >tool.log 2>&1 ||
    fail "tpm2_policyor failed: $(tail -n 1 tool.log)"
fi
tpm2_activatecredential -c ak.ctx -C ek.ctx -i cred.blob -o secret.bin -P session:session.ctx >tool.log 2>&1 ||
  fail "tpm2_activatecredential failed: $(tail -n 1 tool.log)"
tpm2_flushcontext session.ctx >/dev/null 2>&1 || true
flush

# 5. The quote over the PCRs the server asked for, with its nonce.
tpm tpm2_quote -c ak.ctx -l "$selection" -q "$nonce" -m quote.msg -s quote.sig -o quote.pcrs -F values -g sha256
bank=${selection%%:*}
case $bank in sha1) size=20 ;; sha256) size=32 ;; sha384) size=48 ;; *) fail "unknown PCR bank $bank" ;; esac
values=$(hex quote.pcrs)
pcrs=""
i=0
for index in $(printf '%s' "${selection#*:}" | tr ',' ' '); do
  pcrs="$pcrs${pcrs:+,}\"$index\":\"${values:$((i * size * 2)):$((size * 2))}\""
  i=$((i + 1))
done

# 6. Complete: the token and the AK certificate.
post /v1/enroll/complete "{\"enrollment_id\":\"$id\",\"secret\":\"$(b64 secret.bin)\",\"quote\":\"$(b64 quote.msg)\",\"signature\":\"$(b64 quote.sig)\",\"pcrs\":{\"$bank\":{$pcrs}}}"
token=$(field token < answer.json)
[ -n "$token" ] || fail "the completion answer has no token"
(umask 077 && printf '%s\n' "$token" > "$out/token" && cp ak.priv "$out/ak.priv")
# cp keeps an existing file's mode: make sure of 0600 even over an older ak.priv
chmod 600 "$out/token" "$out/ak.priv"
printf '%b' "$(field certificate < answer.json)" > "$out/certificate.pem"
cp ak.pub "$out/"
echo "enrolled as $(field subject < answer.json); token in $out/token, certificate in $out/certificate.pem"
