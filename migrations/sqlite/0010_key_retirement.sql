-- A key is retired once no stored value is sealed with it any more (`authlink keys rewrap`).
-- Start-up refuses a configuration that lacks a key some data may still be sealed with: a key
-- that has a check value here and is not retired.
ALTER TABLE key_checks ADD COLUMN retired_at INTEGER;
