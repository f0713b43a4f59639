-- The keys a maker made, looked up when the maker loses the right to them (removed from a
-- workspace, made a member, disabled): the walk goes from maker to key to the keys it made.
CREATE INDEX api_keys_created_by ON api_keys (created_by);
