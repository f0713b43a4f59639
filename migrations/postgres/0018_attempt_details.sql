-- Connect attempts, as the agency sees them: what went wrong, in a word the page and the
-- agency's listing can name (the scopes a client switched off, the error a provider sent back;
-- never a secret), and the attempts of a link, newest first.
ALTER TABLE oauth_flows ADD COLUMN detail TEXT;
CREATE INDEX oauth_flows_link ON oauth_flows (link_id, id);
