-- Certificates signed by a CA key (at redemption with a CSR, and AK certificates at
-- enrollment), so that revoking the token they came with, the machine, or the certificate
-- itself lists them in the CRL the same CA key signs (GET /v1/crl).
CREATE TABLE certificates (
    serial        TEXT PRIMARY KEY,          -- lowercase hex, no leading zeros
    kid           TEXT NOT NULL REFERENCES signing_keys (kid),  -- the issuing CA key
    jti           TEXT REFERENCES issued_tokens (jti),          -- the token redeemed or issued with it
    subject       TEXT NOT NULL,
    issued_at     BIGINT NOT NULL,
    not_after     BIGINT NOT NULL,
    revoked_at    BIGINT,                   -- revoked on its own (POST /v1/certificates/{serial}/revoke)
    revoke_reason TEXT
);
CREATE INDEX certificates_kid_not_after ON certificates (kid, not_after);
CREATE INDEX certificates_jti ON certificates (jti);
