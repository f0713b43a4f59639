-- The dashboard's handle search: connections whose handle starts with the text typed, in
-- handle order. A prefix of the lower-cased handle is a range of these indexes, which the
-- search walks in order and leaves after one page, however many connections there are: one
-- within a workspace (the connection list), one across workspaces (the platform admins'
-- search). Under a linguistic collation (en_US.UTF-8, ...) a prefix is not a range, so the
-- handle is indexed, and compared by the queries, in the bytewise "C" collation.
CREATE INDEX connections_workspace_handle ON connections (workspace_id, lower(username) COLLATE "C", id);
CREATE INDEX connections_handle ON connections (lower(username) COLLATE "C", id);

-- The audit log's filters, by action and by object: each a range that the newest-first page
-- walks in id order (the log grows with every change, and a rare action or one object's few
-- entries would otherwise mean reading the workspace's whole log).
CREATE INDEX audit_log_workspace_action ON audit_log (workspace_id, action, id);
CREATE INDEX audit_log_target ON audit_log (target_id, id);
