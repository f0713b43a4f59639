-- The link URL each connect attempt was started with (the SHA-256 of its token, as the link is
-- looked up by): a rotation since ends the attempt, whatever the clocks say.
ALTER TABLE oauth_flows ADD COLUMN link_token_hash TEXT;
