-- A workspace's logo: a copy of the image at its logo URL, taken when the URL is set and checked
-- (a PNG, JPEG, GIF or WebP image, bounded in bytes and pixels), so that client pages show it
-- from authlink's own origin and load nothing from other sites. `logo_sha256` names the copy
-- in its URL, which is served as immutable; NULL: no copy (no logo URL, or one set before this).
ALTER TABLE workspaces ADD COLUMN logo_sha256 TEXT;

CREATE TABLE workspace_logos (
    workspace_id TEXT PRIMARY KEY REFERENCES workspaces (id) ON DELETE CASCADE,
    sha256 TEXT NOT NULL,
    content_type TEXT NOT NULL,
    width BIGINT NOT NULL,
    height BIGINT NOT NULL,
    bytes BYTEA NOT NULL,
    fetched_at BIGINT NOT NULL
);
