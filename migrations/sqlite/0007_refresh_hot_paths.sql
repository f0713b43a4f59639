-- Every refresh looks for its connection's unfinished attempts: key the partial index by the
-- connection, so that the lookup reads that connection's few entries only.
DROP INDEX refresh_attempts_open;
CREATE INDEX refresh_attempts_open ON refresh_attempts (connection_id) WHERE outcome = 'started';
