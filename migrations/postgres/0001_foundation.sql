-- The foundation: workspaces, reusable auth links, API keys and the audit log.
--
-- Every timestamp is an BIGINT of milliseconds since the Unix epoch, on SQLite and on
-- PostgreSQL alike, so that the same SQL compares and indexes them the same way on both.
-- Ids are UUIDv7 text: they sort by creation time, which keyset pagination relies on.

-- One row per master key that has sealed data here: start-up opens the check value to prove
-- that the configured key is the one the data was sealed with.
CREATE TABLE key_checks (
    kid         TEXT PRIMARY KEY,
    check_value TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE TABLE workspaces (
    id                TEXT PRIMARY KEY,
    name              TEXT NOT NULL,
    slug              TEXT NOT NULL UNIQUE,
    display_name      TEXT,
    logo_url          TEXT,
    accent_color      TEXT,
    -- JSON array of allowed success-redirect URLs (origin + path prefix).
    allowed_redirects TEXT NOT NULL DEFAULT '[]',
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL
);

CREATE TABLE links (
    id           TEXT PRIMARY KEY,
    workspace_id TEXT NOT NULL REFERENCES workspaces(id),
    label        TEXT NOT NULL,
    client_ref   TEXT,
    -- Comma-separated platform ids, e.g. 'tiktok,instagram'.
    platforms    TEXT NOT NULL,
    expires_at   BIGINT,
    max_uses     BIGINT,
    redirect_url TEXT,
    -- SHA-256 (hex) of the token, for lookup; the token itself is only kept sealed.
    token_hash   TEXT NOT NULL UNIQUE,
    token_sealed TEXT NOT NULL,
    created_by   TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL,
    revoked_at   BIGINT,
    rotated_at   BIGINT,
    last_used_at BIGINT,
    use_count    BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX links_workspace_id ON links (workspace_id, id);

CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,
    -- NULL for platform-admin keys, which span workspaces.
    workspace_id TEXT REFERENCES workspaces(id),
    name         TEXT NOT NULL,
    -- The visible part of the key ('alk_' + 12 characters), unique, used for lookup.
    prefix       TEXT NOT NULL UNIQUE,
    -- SHA-256 (hex) of the whole key; the key is shown once and never stored.
    key_hash     TEXT NOT NULL,
    created_by   TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    last_used_at BIGINT,
    revoked_at   BIGINT
);
CREATE INDEX api_keys_workspace_id ON api_keys (workspace_id, id);

CREATE TABLE audit_log (
    id           TEXT PRIMARY KEY,
    workspace_id TEXT,
    -- 'api_key', 'cli', 'user', 'client' or 'system'.
    actor_kind   TEXT NOT NULL,
    actor_id     TEXT,
    action       TEXT NOT NULL,
    target_kind  TEXT NOT NULL,
    target_id    TEXT NOT NULL,
    -- JSON object with details; never secrets.
    details      TEXT NOT NULL DEFAULT '{}',
    created_at   BIGINT NOT NULL
);
CREATE INDEX audit_log_workspace_id ON audit_log (workspace_id, id);
