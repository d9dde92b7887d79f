-- Schema version 3: a per-account daily roll-up without the user dimension, so /v1/me
-- reads at most days × routes rows however many app users an account has, and a covering
-- index that sums an account's users without touching the table.

CREATE TABLE usage_totals (
    account_id       INTEGER NOT NULL,
    day              TEXT    NOT NULL,
    route            TEXT    NOT NULL,
    requests         INTEGER NOT NULL DEFAULT 0,
    input_tokens     INTEGER NOT NULL DEFAULT 0,
    output_tokens    INTEGER NOT NULL DEFAULT 0,
    charged          INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (account_id, day, route)
) WITHOUT ROWID;

INSERT INTO usage_totals (account_id, day, route, requests, input_tokens, output_tokens, charged)
    SELECT account_id, day, route, sum(requests), sum(input_tokens), sum(output_tokens), sum(charged)
    FROM usage_daily GROUP BY account_id, day, route;

CREATE TRIGGER requests_roll_up_totals AFTER INSERT ON requests
BEGIN
    INSERT INTO usage_totals (account_id, day, route, requests, input_tokens, output_tokens, charged)
        VALUES (NEW.account_id, date(NEW.created_at / 1000, 'unixepoch'), NEW.route, 1,
                NEW.input_tokens, NEW.output_tokens, NEW.charged)
        ON CONFLICT (account_id, day, route) DO UPDATE SET
            requests = requests + 1,
            input_tokens = input_tokens + excluded.input_tokens,
            output_tokens = output_tokens + excluded.output_tokens,
            charged = charged + excluded.charged;
END;

CREATE INDEX usage_daily_by_user
    ON usage_daily (account_id, user_id, day, requests, input_tokens, output_tokens, charged);
