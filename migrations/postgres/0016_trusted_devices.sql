-- Browsers a user has signed in from: the browser holds a random token in a cookie, this table
-- only its SHA-256. A sign-in from such a browser counts its failures against the browser
-- rather than the account, so that someone guessing (or just locking out) an account from
-- elsewhere does not lock its owner out of the browsers they use.
CREATE TABLE trusted_devices (
    id TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    user_id TEXT NOT NULL REFERENCES users(id),
    created_at BIGINT NOT NULL,
    last_used_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX trusted_devices_user ON trusted_devices (user_id, created_at);
