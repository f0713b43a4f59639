-- Leave a fifth of every page of `connections` free, so that the updates that touch no indexed
-- column (claiming a refresh, storing its tokens) can stay on the page as heap-only tuples
-- instead of adding an entry to each of the table's indexes. Applies to pages written from now on.
ALTER TABLE connections SET (fillfactor = 80);

-- Every refresh looks for its connection's unfinished attempts. Keyed by the connection, the
-- partial index answers from that connection's few entries; keyed by the outcome alone, every
-- refresh walked the entries of all attempts that had started since the last vacuum.
DROP INDEX refresh_attempts_open;
CREATE INDEX refresh_attempts_open ON refresh_attempts (connection_id) WHERE outcome = 'started';

-- The overview reads its counts from `connection_counts` (0006): this index no longer answers any
-- query, and every insert and every update of an indexed column of `connections` paid for it.
DROP INDEX connections_workspace_provider_status;
