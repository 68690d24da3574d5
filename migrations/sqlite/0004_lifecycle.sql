-- Token lifecycle: key rotation schedule, key destruction, DPoP replay protection.

-- A `next` key becomes active at `activate_at` (published from creation on, so verifiers
-- learn it before it signs). `destroyed_at`: the key was removed from the device; the row
-- stays, since issued tokens name it.
ALTER TABLE signing_keys ADD COLUMN activate_at INTEGER;
ALTER TABLE signing_keys ADD COLUMN destroyed_at INTEGER;
-- At most one key waits to take over.
CREATE UNIQUE INDEX signing_keys_one_next ON signing_keys (state) WHERE state = 'next';

-- RFC 9449 §11.1: the jti of every DPoP proof accepted, until its iat leaves the window.
-- id = "<jkt>.<jti>".
CREATE TABLE dpop_proofs (
    id   TEXT PRIMARY KEY,
    exp  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX dpop_proofs_exp ON dpop_proofs (exp);
