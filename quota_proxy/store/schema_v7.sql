-- Schema version 7: fewer pages written per request.
--
-- Every request inserts a hold and its settlement deletes it, so each index on holds is
-- one more page in both transactions' WAL frames (and in the next checkpoint's sync). The
-- expiry and owner indexes served only the hold keeper, which scans once per tick a
-- table holding just the requests in flight; holds_key stays, for the per-key concurrency
-- check inside every hold's INSERT.
DROP INDEX holds_expiry;
DROP INDEX holds_owner;
