-- Schema version 2: per-key limits (requests and tokens per minute, concurrent requests).
--
-- Concurrency is counted as the key's open holds, checked inside the hold's INSERT, so it
-- holds across every gateway process on this file. Minute windows count requests (taken
-- before forwarding) and tokens (added when a request settles).

ALTER TABLE api_keys ADD COLUMN rpm INTEGER CHECK (rpm > 0);
ALTER TABLE api_keys ADD COLUMN tpm INTEGER CHECK (tpm > 0);
ALTER TABLE api_keys ADD COLUMN max_concurrent INTEGER CHECK (max_concurrent > 0);

ALTER TABLE holds ADD COLUMN key_id INTEGER;
ALTER TABLE holds ADD COLUMN max_concurrent INTEGER;
CREATE INDEX holds_key ON holds (key_id);

CREATE TRIGGER holds_respect_concurrency BEFORE INSERT ON holds
WHEN NEW.max_concurrent IS NOT NULL
 AND (SELECT count(*) FROM holds WHERE key_id = NEW.key_id) >= NEW.max_concurrent
BEGIN
    SELECT RAISE(ABORT, 'rate_limited');
END;

CREATE TABLE rate_windows (
    key_id           INTEGER NOT NULL,
    minute           INTEGER NOT NULL,
    requests         INTEGER NOT NULL DEFAULT 0,
    tokens           INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, minute)
) WITHOUT ROWID;

CREATE TRIGGER requests_count_tokens AFTER INSERT ON requests
WHEN NEW.key_id IS NOT NULL
BEGIN
    UPDATE rate_windows SET tokens = tokens + NEW.input_tokens + NEW.output_tokens
    WHERE key_id = NEW.key_id AND minute = NEW.created_at / 60000;
END;
