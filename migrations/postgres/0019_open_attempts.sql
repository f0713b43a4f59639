-- The attempts a link has open (started, not yet back from the provider), counted at every start
-- against http.link_open_attempts: only those rows, by link and expiry.
CREATE INDEX oauth_flows_open ON oauth_flows (link_id, expires_at) WHERE consumed_at IS NULL;
