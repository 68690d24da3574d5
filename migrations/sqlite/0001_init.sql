-- keygate schema v1. Times are Unix seconds (UTC).

CREATE TABLE api_tokens (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    -- SHA-256 of the secret; the secret itself is never stored.
    token_hash  BLOB NOT NULL UNIQUE,
    scopes      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER,
    created_by  TEXT NOT NULL
);

CREATE TABLE signing_keys (
    kid           TEXT PRIMARY KEY,
    uri           TEXT NOT NULL UNIQUE,
    backend       TEXT NOT NULL,
    -- next | active | retiring | retired
    state         TEXT NOT NULL CHECK (state IN ('next', 'active', 'retiring', 'retired')),
    jwk           TEXT NOT NULL,
    certificate   TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    activated_at  INTEGER,
    retire_at     INTEGER,
    retired_at    INTEGER
);
CREATE UNIQUE INDEX signing_keys_one_active ON signing_keys (state) WHERE state = 'active';

CREATE TABLE issued_tokens (
    jti          TEXT NOT NULL UNIQUE,
    kid          TEXT NOT NULL REFERENCES signing_keys (kid),
    sub          TEXT NOT NULL,
    aud          TEXT NOT NULL,
    scopes       TEXT NOT NULL,
    iat          INTEGER NOT NULL,
    nbf          INTEGER NOT NULL,
    exp          INTEGER NOT NULL,
    one_time     INTEGER NOT NULL,
    cnf_jkt      TEXT,
    -- the API token (id) that asked for it
    issued_by    TEXT NOT NULL,
    redeemed_at  INTEGER,
    revoked_at   INTEGER,
    revoke_reason TEXT
);
-- A rowid table: rows are appended in issue order and only the small jti index takes
-- random-key inserts. Tokens are looked up by jti and by signing key and expiry
-- (rotation: "has this key signed anything still valid?") (docs/benchmarks.md).
CREATE INDEX issued_tokens_kid_exp ON issued_tokens (kid, exp);

-- Hash-chained audit log: hash = hex SHA-256(prev_hash || "\n" || canonical JSON entry),
-- computed in src/audit/mod.rs.
CREATE TABLE audit_log (
    seq          INTEGER PRIMARY KEY,
    at           INTEGER NOT NULL,
    actor        TEXT NOT NULL,
    action       TEXT NOT NULL,
    target       TEXT NOT NULL,
    outcome      TEXT NOT NULL,
    remote_addr  TEXT NOT NULL,
    prev_hash    TEXT NOT NULL,
    hash         TEXT NOT NULL
);
