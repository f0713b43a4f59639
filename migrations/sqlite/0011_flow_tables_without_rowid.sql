-- SQLite only (PostgreSQL keeps its tables as they are: a heap and its primary key index, with
-- nothing stored twice).
--
-- Every connect flow appends a row to `oauth_flows`, `connection_events` and `audit_log`. Their
-- primary key is a text id, so as ordinary (rowid) tables each kept the id twice: in the table's
-- B-tree under a hidden rowid, and in the primary key's own index; every insert wrote a page of
-- both to the WAL. As WITHOUT ROWID tables the rows live in the primary key's B-tree: one page
-- fewer per insert, three per flow. Ids are UUIDv7, so inserts still append at the right-hand
-- edge of that B-tree. The rows are small (no large values: the audit details are a short JSON
-- object), which is what WITHOUT ROWID suits. The secondary indexes are recreated as they were.

CREATE TABLE oauth_flows_new (
    id                TEXT NOT NULL PRIMARY KEY,
    state_hash        TEXT NOT NULL UNIQUE,
    browser_hash      TEXT NOT NULL,
    link_id           TEXT NOT NULL REFERENCES links(id),
    workspace_id      TEXT NOT NULL REFERENCES workspaces(id),
    provider          TEXT NOT NULL,
    verifier_sealed   TEXT NOT NULL,
    created_at        INTEGER NOT NULL,
    expires_at        INTEGER NOT NULL,
    consumed_at       INTEGER,
    -- 'connected', 'reconnected' or a failure code; set when the callback finishes.
    outcome           TEXT,
    connection_id     TEXT
) WITHOUT ROWID;
INSERT INTO oauth_flows_new (id, state_hash, browser_hash, link_id, workspace_id, provider, verifier_sealed,
    created_at, expires_at, consumed_at, outcome, connection_id)
SELECT id, state_hash, browser_hash, link_id, workspace_id, provider, verifier_sealed,
    created_at, expires_at, consumed_at, outcome, connection_id
FROM oauth_flows;
DROP TABLE oauth_flows;
ALTER TABLE oauth_flows_new RENAME TO oauth_flows;
CREATE INDEX oauth_flows_expires_at ON oauth_flows (expires_at);

CREATE TABLE connection_events_new (
    id            TEXT NOT NULL PRIMARY KEY,
    connection_id TEXT NOT NULL REFERENCES connections(id),
    workspace_id  TEXT NOT NULL,
    kind          TEXT NOT NULL,
    detail        TEXT,
    created_at    INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO connection_events_new (id, connection_id, workspace_id, kind, detail, created_at)
SELECT id, connection_id, workspace_id, kind, detail, created_at FROM connection_events;
DROP TABLE connection_events;
ALTER TABLE connection_events_new RENAME TO connection_events;
CREATE INDEX connection_events_connection_id ON connection_events (connection_id, id);

CREATE TABLE audit_log_new (
    id           TEXT NOT NULL PRIMARY KEY,
    workspace_id TEXT,
    -- 'api_key', 'cli', 'user', 'client' or 'system'.
    actor_kind   TEXT NOT NULL,
    actor_id     TEXT,
    action       TEXT NOT NULL,
    target_kind  TEXT NOT NULL,
    target_id    TEXT NOT NULL,
    -- JSON object with details; never secrets.
    details      TEXT NOT NULL DEFAULT '{}',
    created_at   INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO audit_log_new (id, workspace_id, actor_kind, actor_id, action, target_kind, target_id, details,
    created_at)
SELECT id, workspace_id, actor_kind, actor_id, action, target_kind, target_id, details, created_at
FROM audit_log;
DROP TABLE audit_log;
ALTER TABLE audit_log_new RENAME TO audit_log;
CREATE INDEX audit_log_workspace_id ON audit_log (workspace_id, id);
CREATE INDEX audit_log_workspace_action ON audit_log (workspace_id, action, id);
CREATE INDEX audit_log_target ON audit_log (target_id, id);
