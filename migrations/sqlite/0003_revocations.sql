-- Revocations in the order they happened: `seq` numbers the signed list and (later) the
-- event stream. issued_tokens.revoked_at is set in the same transaction.
CREATE TABLE revocations (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    jti         TEXT NOT NULL UNIQUE,
    exp         INTEGER NOT NULL,
    revoked_at  INTEGER NOT NULL,
    reason      TEXT
);
CREATE INDEX revocations_exp ON revocations (exp);
