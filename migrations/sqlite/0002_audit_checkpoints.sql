-- Signed audit checkpoints: the chain head at `seq`, signed inside the hardware by `kid`.
-- signature = base64url raw r||s (ES256) over "keygate-audit-checkpoint\n<seq>\n<hash>".
CREATE TABLE audit_checkpoints (
    seq        INTEGER PRIMARY KEY,
    hash       TEXT NOT NULL,
    kid        TEXT NOT NULL,
    signature  TEXT NOT NULL,
    at         INTEGER NOT NULL
);
