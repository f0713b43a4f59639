-- Connection health (refresh scheduling with leases, health checks) and webhooks.

-- A per-link switch: hide the list of accounts already connected through the link on its
-- landing page (for links shared with many people).
ALTER TABLE links ADD COLUMN hide_connections BIGINT NOT NULL DEFAULT 0;

-- When the scheduler should next refresh the tokens (NULL: nothing to refresh).
ALTER TABLE connections ADD COLUMN next_refresh_at BIGINT;
-- The refresh lease: which process may refresh this connection, until when. A crashed
-- process's lease simply runs out.
ALTER TABLE connections ADD COLUMN lease_owner TEXT;
ALTER TABLE connections ADD COLUMN lease_until BIGINT;
-- Consecutive transient refresh failures (reset by a success).
ALTER TABLE connections ADD COLUMN refresh_failures BIGINT NOT NULL DEFAULT 0;
ALTER TABLE connections ADD COLUMN next_check_at BIGINT;
ALTER TABLE connections ADD COLUMN last_checked_at BIGINT;
-- When `connection.expiring` was announced for the current grant.
ALTER TABLE connections ADD COLUMN expiring_notified_at BIGINT;

-- The due queries of the scheduler, served by indexes.
CREATE INDEX connections_next_refresh ON connections (next_refresh_at) WHERE status = 'active';
CREATE INDEX connections_next_check ON connections (next_check_at) WHERE status = 'active';
-- Dashboard and API filters.
CREATE INDEX connections_workspace_status ON connections (workspace_id, status, id);
CREATE INDEX connections_workspace_provider ON connections (workspace_id, provider, id);

-- One row per refresh attempt, written before the provider is called and completed after the
-- result is stored: a crash in between leaves a 'started' row that explains what happened.
CREATE TABLE refresh_attempts (
    id              TEXT PRIMARY KEY,
    connection_id   TEXT NOT NULL REFERENCES connections(id),
    owner           TEXT NOT NULL,
    -- The token generation the attempt started from.
    generation      BIGINT NOT NULL,
    -- 'started', 'succeeded', 'transient', 'permanent', 'interrupted', 'superseded'.
    outcome         TEXT NOT NULL,
    detail          TEXT,
    started_at      BIGINT NOT NULL,
    finished_at     BIGINT
);
CREATE INDEX refresh_attempts_connection ON refresh_attempts (connection_id, id);
CREATE INDEX refresh_attempts_open ON refresh_attempts (outcome) WHERE outcome = 'started';

CREATE TABLE webhook_endpoints (
    id                       TEXT PRIMARY KEY,
    workspace_id             TEXT NOT NULL REFERENCES workspaces(id),
    url                      TEXT NOT NULL,
    -- The signing secret (whsec_...), sealed; the previous one stays valid for a day after a
    -- rotation, and deliveries are signed with both.
    secret_sealed            TEXT NOT NULL,
    previous_secret_sealed   TEXT,
    previous_secret_until    BIGINT,
    -- Comma-separated event types, or '*'.
    events                   TEXT NOT NULL,
    enabled                  BIGINT NOT NULL DEFAULT 1,
    disabled_reason          TEXT,
    description              TEXT,
    created_at               BIGINT NOT NULL,
    updated_at               BIGINT NOT NULL
);
CREATE INDEX webhook_endpoints_workspace ON webhook_endpoints (workspace_id, id);

-- The outbox: one row per event, written in the transaction of the change that caused it.
CREATE TABLE webhook_events (
    id            TEXT PRIMARY KEY,
    workspace_id  TEXT NOT NULL,
    event_type    TEXT NOT NULL,
    -- The JSON body, sealed (it may carry repair links, which are capabilities).
    payload       TEXT NOT NULL,
    created_at    BIGINT NOT NULL
);
CREATE INDEX webhook_events_workspace ON webhook_events (workspace_id, id);

-- One row per (event, endpoint): the delivery, retried until it succeeds or gives up.
CREATE TABLE webhook_deliveries (
    id               TEXT PRIMARY KEY,
    event_id         TEXT NOT NULL REFERENCES webhook_events(id),
    endpoint_id      TEXT NOT NULL REFERENCES webhook_endpoints(id),
    workspace_id     TEXT NOT NULL,
    -- 'pending', 'succeeded', 'failed' (gave up), 'cancelled' (endpoint removed or disabled).
    status           TEXT NOT NULL,
    attempts         BIGINT NOT NULL DEFAULT 0,
    next_attempt_at  BIGINT,
    lease_owner      TEXT,
    lease_until      BIGINT,
    last_status_code BIGINT,
    last_error       TEXT,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, id);
CREATE INDEX webhook_deliveries_event ON webhook_deliveries (event_id);

-- The log of every delivery attempt.
CREATE TABLE webhook_attempts (
    id            TEXT PRIMARY KEY,
    delivery_id   TEXT NOT NULL REFERENCES webhook_deliveries(id),
    attempted_at  BIGINT NOT NULL,
    status_code   BIGINT,
    latency_ms    BIGINT NOT NULL,
    -- 'succeeded', 'failed' or 'refused' (e.g. a private address).
    outcome       TEXT NOT NULL,
    error         TEXT
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id, id);

-- Meta data deletion requests (Instagram's data deletion callback).
CREATE TABLE data_deletion_requests (
    confirmation_code     TEXT PRIMARY KEY,
    provider              TEXT NOT NULL,
    connections_affected  BIGINT NOT NULL,
    created_at            BIGINT NOT NULL
);
