-- The refresh schedule and its lease move out of `connections` into a narrow table of their own.
-- Every refresh moves the next refresh time, which the scheduler's due index is keyed on; while
-- that column lived in `connections`, storing a refresh could never be a heap-only update and
-- added an entry to each of that table's indexes (ten of them, two on expressions). Now the token
-- write-back touches no indexed column of `connections`, and the scheduler claims from a small
-- table with two indexes.
--
-- `next_refresh_at` is NULL unless the connection is active: the code that writes a connection's
-- status writes its schedule in the same transaction, so the claim needs no join.
CREATE TABLE refresh_schedule (
    connection_id   TEXT PRIMARY KEY REFERENCES connections (id) ON DELETE CASCADE,
    next_refresh_at BIGINT,
    lease_owner     TEXT,
    lease_until     BIGINT
) WITH (fillfactor = 80);

INSERT INTO refresh_schedule (connection_id, next_refresh_at, lease_owner, lease_until)
SELECT id, CASE WHEN status = 'active' THEN next_refresh_at END, lease_owner, lease_until FROM connections;

CREATE INDEX refresh_schedule_due ON refresh_schedule (next_refresh_at) WHERE next_refresh_at IS NOT NULL;

DROP INDEX connections_next_refresh;
ALTER TABLE connections DROP COLUMN next_refresh_at;
ALTER TABLE connections DROP COLUMN lease_owner;
ALTER TABLE connections DROP COLUMN lease_until;
