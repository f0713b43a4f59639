-- Every refresh looks for its connection's unfinished attempts: key the partial index by the
-- connection, so that the lookup reads that connection's few entries only.
DROP INDEX refresh_attempts_open;
CREATE INDEX refresh_attempts_open ON refresh_attempts (connection_id) WHERE outcome = 'started';

-- The overview reads its counts from `connection_counts` (0006): this index no longer answers any
-- query, and every insert and every update of an indexed column of `connections` paid for it.
DROP INDEX connections_workspace_provider_status;
