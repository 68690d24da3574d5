// An OIDC relying party that knows only keygate's issuer URL: openid-client discovers the
// metadata (`<issuer>/.well-known/openid-configuration`), jose fetches the JWKS it names and
// verifies the token (signature, iss, aud, exp). Prints the verified claims as JSON.
// Usage: node verify.mjs ISSUER AUDIENCE TOKEN
import { Issuer } from 'openid-client';
import { createRemoteJWKSet, jwtVerify } from 'jose';

const [issuerUrl, audience, token] = process.argv.slice(2);
try {
  const issuer = await Issuer.discover(issuerUrl);
  if (issuer.metadata.issuer !== issuerUrl) {
    throw new Error(`discovered issuer ${issuer.metadata.issuer} is not ${issuerUrl}`);
  }
  const algs = issuer.metadata.id_token_signing_alg_values_supported;
  const jwks = createRemoteJWKSet(new URL(issuer.metadata.jwks_uri));
  const { payload, protectedHeader } = await jwtVerify(token, jwks, {
    issuer: issuer.metadata.issuer,
    audience,
    algorithms: algs,
  });
  console.log(JSON.stringify({ alg: protectedHeader.alg, kid: protectedHeader.kid, claims: payload }));
} catch (e) {
  console.error(`refused: ${e.code ?? ''} ${e.message}`);
  process.exit(1);
}
