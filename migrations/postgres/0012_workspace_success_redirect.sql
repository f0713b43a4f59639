-- A workspace's default success redirect: where the success page offers to send a client whose
-- link names none. Must be in the workspace's allow-list (checked on write and when shown).
ALTER TABLE workspaces ADD COLUMN success_redirect TEXT;
