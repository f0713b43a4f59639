-- The running `serve` and `worker` processes, each with the master key it seals new values with
-- and a heartbeat (wall-clock ms). A re-wrap does not retire a key that a process seen lately
-- still seals with: values it wrote after the retirement would need a key about to be removed.
CREATE TABLE processes (
    id TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    host TEXT NOT NULL,
    pid BIGINT NOT NULL,
    active_kid TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    seen_at BIGINT NOT NULL
);
