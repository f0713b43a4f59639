-- Invitations to a workspace. An owner invites an email address; the person who holds the
-- invitation link joins as that address: signed in to the account that uses it, or creating that
-- account with a password of their own. Whether an account uses the address is never shown to
-- the owner, and nobody is added to a workspace without accepting.
--
-- The link's token is stored only as SHA-256 (it is shown to the owner once). Timestamps are
-- milliseconds since the epoch.
CREATE TABLE member_invitations (
    id               TEXT PRIMARY KEY,
    workspace_id     TEXT NOT NULL REFERENCES workspaces(id),
    -- The address as entered (for display), and trimmed and lower-cased (what it matches).
    email            TEXT NOT NULL,
    email_normalized TEXT NOT NULL,
    -- 'owner' or 'member'.
    role             TEXT NOT NULL,
    -- SHA-256 (hex) of the link's token.
    token_hash       TEXT NOT NULL UNIQUE,
    -- The user who invited.
    created_by       TEXT REFERENCES users(id),
    created_at       BIGINT NOT NULL,
    expires_at       BIGINT NOT NULL,
    accepted_at      BIGINT,
    accepted_by      TEXT REFERENCES users(id),
    revoked_at       BIGINT
);
CREATE INDEX member_invitations_workspace ON member_invitations (workspace_id, email_normalized);
