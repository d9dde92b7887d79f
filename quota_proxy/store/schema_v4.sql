-- Schema version 4: usage in disjoint buckets, the agent's session, and the outcome checked.
--
-- Buckets never overlap: input_tokens is uncached input only; cache_read_tokens,
-- cache_write_tokens (short-lived, 5 minutes) and cache_write_1h_tokens are the rest of the
-- prompt. Billed tokens = input + cache_read + cache_write + cache_write_1h + output.
-- reasoning_tokens is information only: those tokens are already inside output_tokens.
--
-- SQLite cannot add a CHECK to an existing column without rebuilding the table, so the
-- outcome is checked by triggers; the list is quota_proxy.store.models.Outcome.

ALTER TABLE requests ADD COLUMN cache_read_tokens INTEGER NOT NULL DEFAULT 0
    CHECK (cache_read_tokens >= 0);
ALTER TABLE requests ADD COLUMN cache_write_tokens INTEGER NOT NULL DEFAULT 0
    CHECK (cache_write_tokens >= 0);
ALTER TABLE requests ADD COLUMN cache_write_1h_tokens INTEGER NOT NULL DEFAULT 0
    CHECK (cache_write_1h_tokens >= 0);
ALTER TABLE requests ADD COLUMN reasoning_tokens INTEGER NOT NULL DEFAULT 0
    CHECK (reasoning_tokens >= 0);
ALTER TABLE requests ADD COLUMN session_id TEXT;

CREATE INDEX requests_session ON requests (account_id, session_id, created_at)
    WHERE session_id IS NOT NULL;

-- The one value written before the outcome had a type (an upstream 4xx passed through).
UPDATE requests SET outcome = 'upstream_rejected' WHERE outcome = 'rejected';

CREATE TRIGGER requests_outcome_is_known BEFORE INSERT ON requests
WHEN NEW.outcome NOT IN ('ok', 'client_disconnected', 'upstream_rejected', 'upstream_error',
                         'upstream_malformed', 'upstream_broken', 'failed')
BEGIN
    SELECT RAISE(ABORT, 'requests.outcome: not a known outcome');
END;

CREATE TRIGGER requests_outcome_stays_known BEFORE UPDATE OF outcome ON requests
WHEN NEW.outcome NOT IN ('ok', 'client_disconnected', 'upstream_rejected', 'upstream_error',
                         'upstream_malformed', 'upstream_broken', 'failed')
BEGIN
    SELECT RAISE(ABORT, 'requests.outcome: not a known outcome');
END;

ALTER TABLE usage_daily ADD COLUMN cache_read_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_daily ADD COLUMN cache_write_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_daily ADD COLUMN cache_write_1h_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_daily ADD COLUMN reasoning_tokens INTEGER NOT NULL DEFAULT 0;

ALTER TABLE usage_totals ADD COLUMN cache_read_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_totals ADD COLUMN cache_write_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_totals ADD COLUMN cache_write_1h_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_totals ADD COLUMN reasoning_tokens INTEGER NOT NULL DEFAULT 0;

-- The per-user index stays covering, so summing an account's users still reads no table rows.
DROP INDEX usage_daily_by_user;
CREATE INDEX usage_daily_by_user
    ON usage_daily (account_id, user_id, day, requests, input_tokens, output_tokens, charged,
                    cache_read_tokens, cache_write_tokens, cache_write_1h_tokens, reasoning_tokens);

-- The settlement triggers, now carrying every bucket.
DROP TRIGGER requests_settle;
CREATE TRIGGER requests_settle AFTER INSERT ON requests
BEGIN
    DELETE FROM holds WHERE id = NEW.hold_id;
    INSERT INTO ledger (public_id, account_id, amount, balance_after, kind, request_id,
                        description, created_at)
        SELECT NEW.ledger_id, NEW.charged_account_id, -NEW.charged, balance - NEW.charged,
               'charge', NEW.request_id, NEW.route, NEW.created_at
        FROM accounts WHERE id = NEW.charged_account_id AND NEW.charged > 0;
    INSERT INTO usage_daily (account_id, user_id, route, day, requests, input_tokens,
                             output_tokens, charged, cache_read_tokens, cache_write_tokens,
                             cache_write_1h_tokens, reasoning_tokens)
        VALUES (NEW.account_id, coalesce(NEW.user_id, 0), NEW.route,
                date(NEW.created_at / 1000, 'unixepoch'), 1, NEW.input_tokens,
                NEW.output_tokens, NEW.charged, NEW.cache_read_tokens, NEW.cache_write_tokens,
                NEW.cache_write_1h_tokens, NEW.reasoning_tokens)
        ON CONFLICT (account_id, day, route, user_id) DO UPDATE SET
            requests = requests + 1,
            input_tokens = input_tokens + excluded.input_tokens,
            output_tokens = output_tokens + excluded.output_tokens,
            charged = charged + excluded.charged,
            cache_read_tokens = cache_read_tokens + excluded.cache_read_tokens,
            cache_write_tokens = cache_write_tokens + excluded.cache_write_tokens,
            cache_write_1h_tokens = cache_write_1h_tokens + excluded.cache_write_1h_tokens,
            reasoning_tokens = reasoning_tokens + excluded.reasoning_tokens;
END;

DROP TRIGGER requests_roll_up_totals;
CREATE TRIGGER requests_roll_up_totals AFTER INSERT ON requests
BEGIN
    INSERT INTO usage_totals (account_id, day, route, requests, input_tokens, output_tokens,
                              charged, cache_read_tokens, cache_write_tokens,
                              cache_write_1h_tokens, reasoning_tokens)
        VALUES (NEW.account_id, date(NEW.created_at / 1000, 'unixepoch'), NEW.route, 1,
                NEW.input_tokens, NEW.output_tokens, NEW.charged, NEW.cache_read_tokens,
                NEW.cache_write_tokens, NEW.cache_write_1h_tokens, NEW.reasoning_tokens)
        ON CONFLICT (account_id, day, route) DO UPDATE SET
            requests = requests + 1,
            input_tokens = input_tokens + excluded.input_tokens,
            output_tokens = output_tokens + excluded.output_tokens,
            charged = charged + excluded.charged,
            cache_read_tokens = cache_read_tokens + excluded.cache_read_tokens,
            cache_write_tokens = cache_write_tokens + excluded.cache_write_tokens,
            cache_write_1h_tokens = cache_write_1h_tokens + excluded.cache_write_1h_tokens,
            reasoning_tokens = reasoning_tokens + excluded.reasoning_tokens;
END;

-- A key's tokens per minute count every billed token (reasoning is inside output).
DROP TRIGGER requests_count_tokens;
CREATE TRIGGER requests_count_tokens AFTER INSERT ON requests
WHEN NEW.key_id IS NOT NULL
BEGIN
    UPDATE rate_windows
    SET tokens = tokens + NEW.input_tokens + NEW.cache_read_tokens + NEW.cache_write_tokens
                 + NEW.cache_write_1h_tokens + NEW.output_tokens
    WHERE key_id = NEW.key_id AND minute = NEW.created_at / 60000;
END;
