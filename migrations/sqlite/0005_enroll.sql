-- Attestation-gated enrollment (API.md "Attestation-gated enrollment"; docs/api-notes.md).

-- A machine is its EK: ek_hash = lowercase hex SHA-256 of the EK's DER SubjectPublicKeyInfo.
-- A row exists once an operator registers it or it first enrolls. `name` is the registered
-- name (NULL: enrolled without one; its tokens' sub is urn:keygate:tpm:ek:<ek_hash>).
CREATE TABLE machines (
    ek_hash        TEXT PRIMARY KEY,
    name           TEXT UNIQUE,
    registered_at  INTEGER,
    registered_by  TEXT,
    enrolled_at    INTEGER,
    revoked_at     INTEGER
) WITHOUT ROWID;

-- One challenge each: completed at most once (used_at), before expires_at. The secret
-- itself is never stored, only its SHA-256. `jti` names the token a successful one issued,
-- so revoking the machine finds its tokens.
CREATE TABLE enrollments (
    id             TEXT PRIMARY KEY,
    ek_hash        TEXT NOT NULL,
    ak_pub         BLOB NOT NULL,
    secret_hash    BLOB NOT NULL,
    nonce          BLOB NOT NULL,
    pcr_selection  TEXT NOT NULL,
    created_at     INTEGER NOT NULL,
    expires_at     INTEGER NOT NULL,
    used_at        INTEGER,
    outcome        TEXT,
    jti            TEXT
);
CREATE INDEX enrollments_ek_hash ON enrollments (ek_hash);
CREATE INDEX enrollments_unissued_expiry ON enrollments (expires_at) WHERE jti IS NULL;
