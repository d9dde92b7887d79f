-- Schema version 4: fewer index entries written per request (schema_v7.sql on SQLite).
--
-- Every request inserts a hold and its settlement deletes it; the expiry and owner
-- indexes served only the hold keeper's once-per-tick scans of a table holding just the
-- requests in flight. Without the expiry index the keeper's refresh (UPDATE expires_at)
-- is a heap-only update. holds_key (the concurrency check) and holds_request (one hold
-- per request) stay.
DROP INDEX holds_expiry;
DROP INDEX holds_owner;
