-- How many connections each workspace has, per platform and status: what the dashboard's
-- overview shows. Counting them from an index reads one entry per connection on every view,
-- and more than that when the visibility map lags behind the updates (an index-only scan then
-- visits the table, or the planner prefers a sequential scan): 7 to 40 ms at 100,000
-- connections. These counters are kept in step by triggers, in the transaction of every
-- change, whichever code (or person) writes the rows.
CREATE TABLE connection_counts (
    workspace_id TEXT NOT NULL,
    provider     TEXT NOT NULL,
    status       TEXT NOT NULL,
    n            BIGINT NOT NULL,
    PRIMARY KEY (workspace_id, provider, status)
);

INSERT INTO connection_counts (workspace_id, provider, status, n)
SELECT workspace_id, provider, status, COUNT(*) FROM connections GROUP BY workspace_id, provider, status;

-- The functions run with the search path of this migration (`SET search_path FROM CURRENT`),
-- so that they find `connection_counts` next to `connections` whatever the search path of the
-- session that writes (a statement may name `<schema>.connections` from anywhere).
--
-- Inserts and deletes are counted once per statement, from its transition table, so that a
-- bulk statement updates each counter once rather than once per row (repeated updates of one
-- row in a transaction leave a chain of versions behind).
CREATE FUNCTION connection_counts_add() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO connection_counts AS c (workspace_id, provider, status, n)
    SELECT workspace_id, provider, status, COUNT(*) FROM added
    GROUP BY workspace_id, provider, status ORDER BY workspace_id, provider, status
    ON CONFLICT (workspace_id, provider, status) DO UPDATE SET n = c.n + EXCLUDED.n;
    RETURN NULL;
END;
$$;

CREATE FUNCTION connection_counts_remove() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE connection_counts AS c SET n = c.n - r.n
    FROM (SELECT workspace_id, provider, status, COUNT(*) AS n FROM removed
          GROUP BY workspace_id, provider, status) AS r
    WHERE c.workspace_id = r.workspace_id AND c.provider = r.provider AND c.status = r.status;
    RETURN NULL;
END;
$$;

-- A change of workspace, platform or status moves one connection between two counters. They
-- are locked in key order, so that opposite moves in concurrent transactions (a connection
-- breaking while another is repaired) cannot deadlock.
CREATE FUNCTION connection_counts_move() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF (OLD.workspace_id, OLD.provider, OLD.status) < (NEW.workspace_id, NEW.provider, NEW.status) THEN
        UPDATE connection_counts SET n = n - 1
        WHERE workspace_id = OLD.workspace_id AND provider = OLD.provider AND status = OLD.status;
    END IF;
    INSERT INTO connection_counts AS c (workspace_id, provider, status, n)
    VALUES (NEW.workspace_id, NEW.provider, NEW.status, 1)
    ON CONFLICT (workspace_id, provider, status) DO UPDATE SET n = c.n + 1;
    IF (OLD.workspace_id, OLD.provider, OLD.status) > (NEW.workspace_id, NEW.provider, NEW.status) THEN
        UPDATE connection_counts SET n = n - 1
        WHERE workspace_id = OLD.workspace_id AND provider = OLD.provider AND status = OLD.status;
    END IF;
    RETURN NULL;
END;
$$;

CREATE FUNCTION connection_counts_clear() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    DELETE FROM connection_counts;
    RETURN NULL;
END;
$$;

CREATE TRIGGER connection_counts_insert AFTER INSERT ON connections
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION connection_counts_add();

CREATE TRIGGER connection_counts_delete AFTER DELETE ON connections
    REFERENCING OLD TABLE AS removed
    FOR EACH STATEMENT EXECUTE FUNCTION connection_counts_remove();

-- The WHEN clause keeps every other update (token refreshes, leases, health checks) free.
CREATE TRIGGER connection_counts_update AFTER UPDATE OF workspace_id, provider, status ON connections
    FOR EACH ROW
    WHEN (OLD.workspace_id IS DISTINCT FROM NEW.workspace_id OR OLD.provider IS DISTINCT FROM NEW.provider
          OR OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION connection_counts_move();

CREATE TRIGGER connection_counts_truncate AFTER TRUNCATE ON connections
    FOR EACH STATEMENT EXECUTE FUNCTION connection_counts_clear();
