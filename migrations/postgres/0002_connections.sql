-- The connect flow: OAuth attempts, connections and their history.

-- One row per started OAuth flow. The state and the browser-binding cookie are stored as
-- SHA-256 only; the PKCE verifier is sealed. A row is consumed on first use.
CREATE TABLE oauth_flows (
    id                TEXT PRIMARY KEY,
    state_hash        TEXT NOT NULL UNIQUE,
    browser_hash      TEXT NOT NULL,
    link_id           TEXT NOT NULL REFERENCES links(id),
    workspace_id      TEXT NOT NULL REFERENCES workspaces(id),
    provider          TEXT NOT NULL,
    verifier_sealed   TEXT NOT NULL,
    created_at        BIGINT NOT NULL,
    expires_at        BIGINT NOT NULL,
    consumed_at       BIGINT,
    -- 'connected', 'reconnected' or a failure code; set when the callback finishes.
    outcome           TEXT,
    connection_id     TEXT
);
CREATE INDEX oauth_flows_expires_at ON oauth_flows (expires_at);

CREATE TABLE connections (
    id                    TEXT PRIMARY KEY,
    workspace_id          TEXT NOT NULL REFERENCES workspaces(id),
    -- The link the account was last connected through.
    link_id               TEXT REFERENCES links(id),
    provider              TEXT NOT NULL,
    provider_account_id   TEXT NOT NULL,
    -- Instagram's app-scoped id (deauthorization callbacks name it).
    app_scoped_id         TEXT,
    username              TEXT,
    display_name          TEXT,
    avatar_url            TEXT,
    -- Comma-separated scopes granted.
    scopes                TEXT NOT NULL,
    access_token_sealed   TEXT,
    access_expires_at     BIGINT,
    refresh_token_sealed  TEXT,
    refresh_expires_at    BIGINT,
    -- Increases with every new token pair; refreshes write back by compare-and-set on it.
    token_generation      BIGINT NOT NULL DEFAULT 0,
    -- 'active', 'broken' or 'disconnected'.
    status                TEXT NOT NULL,
    status_reason         TEXT,
    sandbox               BIGINT NOT NULL DEFAULT 0,
    connected_at          BIGINT NOT NULL,
    last_refreshed_at     BIGINT,
    reconnect_count       BIGINT NOT NULL DEFAULT 0,
    created_at            BIGINT NOT NULL,
    updated_at            BIGINT NOT NULL,
    UNIQUE (workspace_id, provider, provider_account_id)
);
CREATE INDEX connections_workspace_id ON connections (workspace_id, id);
CREATE INDEX connections_link_id ON connections (link_id);

-- The history of each connection: created, reconnected, refreshed, broken, disconnected, ...
CREATE TABLE connection_events (
    id            TEXT PRIMARY KEY,
    connection_id TEXT NOT NULL REFERENCES connections(id),
    workspace_id  TEXT NOT NULL,
    kind          TEXT NOT NULL,
    detail        TEXT,
    created_at    BIGINT NOT NULL
);
CREATE INDEX connection_events_connection_id ON connection_events (connection_id, id);
