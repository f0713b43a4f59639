-- Dashboard operators: users, workspace memberships, server-side sessions and the login
-- throttle.
--
-- Passwords are stored only as argon2id PHC strings; session tokens only as SHA-256 (the token
-- itself lives in the browser's HttpOnly cookie). Timestamps are milliseconds since the epoch.

CREATE TABLE users (
    id                  TEXT PRIMARY KEY,
    -- The address as entered (for display).
    email               TEXT NOT NULL,
    -- Trimmed and lower-cased: the unique key, so addresses are unique case-insensitively.
    email_normalized    TEXT NOT NULL UNIQUE,
    -- argon2id PHC string ($argon2id$v=19$m=19456,t=2,p=1$salt$hash).
    password_hash       TEXT NOT NULL,
    -- 1 for platform admins (the support team): every workspace.
    is_admin            INTEGER NOT NULL DEFAULT 0,
    -- Disabled users cannot sign in and their sessions are deleted.
    disabled_at         INTEGER,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL,
    password_changed_at INTEGER NOT NULL,
    last_login_at       INTEGER
);

-- Which workspaces a user belongs to, and as what ('owner' or 'member').
CREATE TABLE memberships (
    user_id      TEXT NOT NULL REFERENCES users(id),
    workspace_id TEXT NOT NULL REFERENCES workspaces(id),
    role         TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (user_id, workspace_id)
);
CREATE INDEX memberships_workspace ON memberships (workspace_id, user_id);

-- Server-side sessions. A session ends at `expires_at` (absolute lifetime) or when it has not
-- been used for the idle timeout (`last_seen_at`), whichever comes first.
CREATE TABLE sessions (
    id           TEXT PRIMARY KEY,
    -- SHA-256 (hex) of the cookie's token.
    token_hash   TEXT NOT NULL UNIQUE,
    user_id      TEXT NOT NULL REFERENCES users(id),
    created_at   INTEGER NOT NULL,
    last_seen_at INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    -- The client address at sign-in (for the user's own information and investigations).
    ip           TEXT
);
CREATE INDEX sessions_user ON sessions (user_id);
CREATE INDEX sessions_expires ON sessions (expires_at);

-- Failed sign-ins, counted per account and per client address over a sliding window. Kept in
-- the database so that the limits survive restarts and hold across instances. The account is
-- stored as SHA-256 of the normalized email (people sometimes type a password into the email
-- field), whether or not such an account exists.
CREATE TABLE login_failures (
    id          TEXT PRIMARY KEY,
    account_key TEXT NOT NULL,
    ip          TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE INDEX login_failures_account ON login_failures (account_key, created_at);
CREATE INDEX login_failures_ip ON login_failures (ip, created_at);
CREATE INDEX login_failures_created ON login_failures (created_at);

-- The dashboard overview counts a workspace's connections by platform and status: a covering
-- index answers that from the index alone, however many connections there are.
CREATE INDEX connections_workspace_provider_status ON connections (workspace_id, provider, status);
