-- The refresh schedule and its lease move out of `connections` into a narrow table of their own
-- (the same change as on PostgreSQL, where it matters most: storing a refresh no longer moves an
-- indexed column of `connections`, so it adds no entry to that table's indexes, and the scheduler
-- claims from a small table).
--
-- `next_refresh_at` is NULL unless the connection is active: the code that writes a connection's
-- status writes its schedule in the same transaction, so the claim needs no join.
CREATE TABLE refresh_schedule (
    connection_id   TEXT PRIMARY KEY REFERENCES connections (id) ON DELETE CASCADE,
    next_refresh_at INTEGER,
    lease_owner     TEXT,
    lease_until     INTEGER
);

INSERT INTO refresh_schedule (connection_id, next_refresh_at, lease_owner, lease_until)
SELECT id, CASE WHEN status = 'active' THEN next_refresh_at END, lease_owner, lease_until FROM connections;

CREATE INDEX refresh_schedule_due ON refresh_schedule (next_refresh_at) WHERE next_refresh_at IS NOT NULL;

DROP INDEX connections_next_refresh;
ALTER TABLE connections DROP COLUMN next_refresh_at;
ALTER TABLE connections DROP COLUMN lease_owner;
ALTER TABLE connections DROP COLUMN lease_until;
