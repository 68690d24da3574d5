-- Several key devices in one deployment (docs/adr/0011-replicas-on-postgresql.md): replicas
-- that share one PKCS#11 token share its keys (device 'pkcs11'); a TPM belongs to one
-- machine, so each TPM replica signs with a key in its own TPM (device 'tpm:<id>'). Each
-- device has at most one active and one next key. TPM rows recorded before this migration
-- get their device when the replica that holds them next starts.
ALTER TABLE signing_keys ADD COLUMN device TEXT NOT NULL DEFAULT '';
UPDATE signing_keys SET device = 'pkcs11' WHERE backend = 'pkcs11';
DROP INDEX signing_keys_one_active;
DROP INDEX signing_keys_one_next;
CREATE UNIQUE INDEX signing_keys_one_active ON signing_keys (device) WHERE state = 'active';
CREATE UNIQUE INDEX signing_keys_one_next ON signing_keys (device) WHERE state = 'next';
