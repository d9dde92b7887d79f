-- quota-proxy PostgreSQL store, schema version 1 (mirrors SQLite schema v1..v4).
--
-- The money invariants live here, next to the data, so that no code path and no gateway
-- machine can skip them:
--   * a balance changes only through a ledger row: the ledger's BEFORE INSERT trigger moves
--     the balance with `UPDATE … SET balance = balance + amount` (which takes the row lock
--     and reads the newest version) and writes the result into the row's balance_after;
--     any other UPDATE of accounts.balance is refused;
--   * the ledger is append-only: UPDATE, DELETE and TRUNCATE are refused;
--   * a hold is taken by the conditional `UPDATE accounts SET held = held + amount
--     WHERE id = … AND balance - held >= amount` inside the hold's INSERT: one statement,
--     re-checked under the row lock, so two gateways can never both fit into one balance;
--     held changes only through holds (INSERT adds, DELETE subtracts);
--   * settling a request is one INSERT into requests, keyed by request_id (a second settle
--     of the same request is a no-op): its trigger releases the hold, writes the charge's
--     ledger row and the usage roll-ups in the same statement.
-- Times are unix milliseconds from the database's clock (quota_now_ms), so gateway
-- machines with skewed clocks still agree on hold expiry and rate windows.

CREATE FUNCTION quota_now_ms() RETURNS bigint LANGUAGE sql VOLATILE AS $$
    SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint
$$;

CREATE TABLE accounts (
    id               bigserial PRIMARY KEY,
    public_id        text    NOT NULL UNIQUE,
    kind             text    NOT NULL CHECK (kind IN ('developer', 'user')),
    name             text    NOT NULL,
    parent_id        bigint  REFERENCES accounts (id),
    billing_mode     text    NOT NULL DEFAULT 'user' CHECK (billing_mode IN ('user', 'developer')),
    balance          bigint  NOT NULL DEFAULT 0,
    held             bigint  NOT NULL DEFAULT 0 CHECK (held >= 0),
    created_at       bigint  NOT NULL,
    CHECK ((kind = 'developer') = (parent_id IS NULL))
);
CREATE UNIQUE INDEX accounts_developer_name ON accounts (name) WHERE kind = 'developer';
CREATE UNIQUE INDEX accounts_user_name ON accounts (parent_id, name) WHERE kind = 'user';

CREATE FUNCTION accounts_start_empty() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.balance <> 0 OR NEW.held <> 0 THEN
        RAISE EXCEPTION 'a new account starts at zero; fund it through the ledger';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER accounts_start_empty BEFORE INSERT ON accounts
    FOR EACH ROW EXECUTE FUNCTION accounts_start_empty();

-- Direct UPDATEs of balance or held run at trigger depth 1 and are refused; the ledger's and
-- the holds' triggers run them one level deeper.
CREATE FUNCTION accounts_money_moves_by_trigger() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF pg_trigger_depth() < 2 THEN
        IF NEW.balance IS DISTINCT FROM OLD.balance THEN
            RAISE EXCEPTION 'a balance changes only through a ledger entry';
        END IF;
        IF NEW.held IS DISTINCT FROM OLD.held THEN
            RAISE EXCEPTION 'held changes only through holds';
        END IF;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER accounts_money_moves_by_trigger BEFORE UPDATE OF balance, held ON accounts
    FOR EACH ROW EXECUTE FUNCTION accounts_money_moves_by_trigger();

CREATE TABLE api_keys (
    id               bigserial PRIMARY KEY,
    public_id        text    NOT NULL UNIQUE,
    account_id       bigint  NOT NULL REFERENCES accounts (id),
    kind             text    NOT NULL CHECK (kind IN ('live', 'secret')),
    name             text    NOT NULL DEFAULT '',
    digest           text    NOT NULL UNIQUE,
    prefix           text    NOT NULL,
    routes           text,
    allow_community  boolean NOT NULL DEFAULT true,
    expires_at       bigint,
    revoked_at       bigint,
    created_at       bigint  NOT NULL,
    rpm              integer CHECK (rpm > 0),
    tpm              integer CHECK (tpm > 0),
    max_concurrent   integer CHECK (max_concurrent > 0)
);
CREATE INDEX api_keys_account ON api_keys (account_id);
CREATE INDEX api_keys_prefix ON api_keys (prefix);

CREATE TABLE ledger (
    id               bigserial PRIMARY KEY,
    public_id        text    NOT NULL UNIQUE,
    account_id       bigint  NOT NULL REFERENCES accounts (id),
    amount           bigint  NOT NULL CHECK (amount <> 0),
    balance_after    bigint  NOT NULL,
    kind             text    NOT NULL
                     CHECK (kind IN ('purchase', 'credit', 'grant', 'charge', 'refund', 'adjustment')),
    request_id       text,
    idempotency_key  text,
    related_id       text,
    description      text    NOT NULL DEFAULT '',
    created_at       bigint  NOT NULL
);
CREATE INDEX ledger_account ON ledger (account_id, id);

CREATE FUNCTION ledger_moves_balance() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE accounts SET balance = balance + NEW.amount WHERE id = NEW.account_id
        RETURNING balance INTO NEW.balance_after;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'ledger entry for a missing account %', NEW.account_id;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER ledger_moves_balance BEFORE INSERT ON ledger
    FOR EACH ROW EXECUTE FUNCTION ledger_moves_balance();

CREATE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only';
END $$;
CREATE TRIGGER ledger_no_update BEFORE UPDATE OR DELETE ON ledger
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON ledger
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();

CREATE TABLE holds (
    id               bigserial PRIMARY KEY,
    account_id       bigint  NOT NULL REFERENCES accounts (id),
    amount           bigint  NOT NULL CHECK (amount > 0),
    request_id       text    NOT NULL,
    owner            text    NOT NULL,
    expires_at       bigint  NOT NULL,
    created_at       bigint  NOT NULL,
    key_id           bigint,
    max_concurrent   integer
);
CREATE INDEX holds_expiry ON holds (expires_at);
CREATE INDEX holds_owner ON holds (owner);
CREATE INDEX holds_key ON holds (key_id);
-- One hold per request: a hold retried after a lost connection finds the first one.
CREATE UNIQUE INDEX holds_request ON holds (request_id);

-- SQLSTATE QP001 = insufficient balance (DETAIL: the available amount), QP002 = too many in flight.
CREATE FUNCTION holds_reserve() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    available bigint;
BEGIN
    IF NEW.max_concurrent IS NOT NULL AND NEW.key_id IS NOT NULL THEN
        -- One key's holds are counted under a per-key lock held to commit, so gateways on
        -- different machines see each other's holds before counting.
        PERFORM pg_advisory_xact_lock(1364, NEW.key_id::integer);
        IF (SELECT count(*) FROM holds WHERE key_id = NEW.key_id) >= NEW.max_concurrent THEN
            RAISE EXCEPTION 'rate_limited' USING ERRCODE = 'QP002';
        END IF;
    END IF;
    UPDATE accounts SET held = held + NEW.amount
        WHERE id = NEW.account_id AND balance - held >= NEW.amount;
    IF NOT FOUND THEN
        SELECT balance - held INTO available FROM accounts WHERE id = NEW.account_id;
        RAISE EXCEPTION 'insufficient_balance'
            USING ERRCODE = 'QP001', DETAIL = coalesce(available, 0)::text;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER holds_reserve BEFORE INSERT ON holds
    FOR EACH ROW EXECUTE FUNCTION holds_reserve();

CREATE FUNCTION holds_release() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE accounts SET held = held - OLD.amount WHERE id = OLD.account_id;
    RETURN OLD;
END $$;
CREATE TRIGGER holds_release AFTER DELETE ON holds
    FOR EACH ROW EXECUTE FUNCTION holds_release();

CREATE FUNCTION holds_amount_fixed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.amount IS DISTINCT FROM OLD.amount OR NEW.account_id IS DISTINCT FROM OLD.account_id THEN
        RAISE EXCEPTION 'a hold is released and taken again, never changed';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER holds_amount_fixed BEFORE UPDATE ON holds
    FOR EACH ROW EXECUTE FUNCTION holds_amount_fixed();

CREATE TABLE requests (
    id                    bigserial PRIMARY KEY,
    request_id            text    NOT NULL UNIQUE,
    account_id            bigint  NOT NULL REFERENCES accounts (id),
    user_id               bigint  REFERENCES accounts (id),
    charged_account_id    bigint  NOT NULL REFERENCES accounts (id),
    key_id                bigint,
    hold_id               bigint,
    route                 text    NOT NULL,
    upstream_model        text    NOT NULL,
    input_tokens          bigint  NOT NULL CHECK (input_tokens >= 0),
    output_tokens         bigint  NOT NULL CHECK (output_tokens >= 0),
    cache_read_tokens     bigint  NOT NULL DEFAULT 0 CHECK (cache_read_tokens >= 0),
    cache_write_tokens    bigint  NOT NULL DEFAULT 0 CHECK (cache_write_tokens >= 0),
    cache_write_1h_tokens bigint  NOT NULL DEFAULT 0 CHECK (cache_write_1h_tokens >= 0),
    reasoning_tokens      bigint  NOT NULL DEFAULT 0 CHECK (reasoning_tokens >= 0),
    session_id            text,
    multiplier            text    NOT NULL,
    charged               bigint  NOT NULL CHECK (charged >= 0),
    estimated             boolean NOT NULL DEFAULT false,
    outcome               text    NOT NULL CHECK (outcome IN (
                              'ok', 'client_disconnected', 'upstream_rejected', 'upstream_error',
                              'upstream_malformed', 'upstream_broken', 'failed')),
    status                integer NOT NULL,
    ledger_id             text,
    created_at            bigint  NOT NULL
);
CREATE INDEX requests_account_time ON requests (account_id, created_at);
CREATE INDEX requests_session ON requests (account_id, session_id, created_at)
    WHERE session_id IS NOT NULL;
CREATE INDEX requests_ledger ON requests (ledger_id) WHERE ledger_id IS NOT NULL;

CREATE TABLE usage_daily (
    account_id       bigint  NOT NULL,
    user_id          bigint  NOT NULL DEFAULT 0,
    route            text    NOT NULL,
    day              text    NOT NULL,
    requests         bigint  NOT NULL DEFAULT 0,
    input_tokens     bigint  NOT NULL DEFAULT 0,
    output_tokens    bigint  NOT NULL DEFAULT 0,
    charged          bigint  NOT NULL DEFAULT 0,
    cache_read_tokens     bigint  NOT NULL DEFAULT 0,
    cache_write_tokens    bigint  NOT NULL DEFAULT 0,
    cache_write_1h_tokens bigint  NOT NULL DEFAULT 0,
    reasoning_tokens      bigint  NOT NULL DEFAULT 0,
    PRIMARY KEY (account_id, day, route, user_id)
);
CREATE INDEX usage_daily_by_user
    ON usage_daily (account_id, user_id, day)
    INCLUDE (requests, input_tokens, output_tokens, charged, cache_read_tokens, cache_write_tokens,
             cache_write_1h_tokens, reasoning_tokens);

CREATE TABLE usage_totals (
    account_id       bigint  NOT NULL,
    day              text    NOT NULL,
    route            text    NOT NULL,
    requests         bigint  NOT NULL DEFAULT 0,
    input_tokens     bigint  NOT NULL DEFAULT 0,
    output_tokens    bigint  NOT NULL DEFAULT 0,
    charged          bigint  NOT NULL DEFAULT 0,
    cache_read_tokens     bigint  NOT NULL DEFAULT 0,
    cache_write_tokens    bigint  NOT NULL DEFAULT 0,
    cache_write_1h_tokens bigint  NOT NULL DEFAULT 0,
    reasoning_tokens      bigint  NOT NULL DEFAULT 0,
    PRIMARY KEY (account_id, day, route)
);

CREATE TABLE rate_windows (
    key_id           bigint  NOT NULL,
    minute           bigint  NOT NULL,
    requests         bigint  NOT NULL DEFAULT 0,
    tokens           bigint  NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, minute)
);

CREATE FUNCTION requests_settle() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    utc_day text := to_char(to_timestamp(NEW.created_at / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD');
BEGIN
    IF NEW.hold_id IS NOT NULL THEN
        DELETE FROM holds WHERE id = NEW.hold_id;
    END IF;
    IF NEW.charged > 0 THEN
        INSERT INTO ledger (public_id, account_id, amount, balance_after, kind, request_id,
                            description, created_at)
            VALUES (NEW.ledger_id, NEW.charged_account_id, -NEW.charged, 0, 'charge',
                    NEW.request_id, NEW.route, NEW.created_at);
    END IF;
    INSERT INTO usage_daily AS u (account_id, user_id, route, day, requests, input_tokens,
                                  output_tokens, charged, cache_read_tokens, cache_write_tokens,
                                  cache_write_1h_tokens, reasoning_tokens)
        VALUES (NEW.account_id, coalesce(NEW.user_id, 0), NEW.route, utc_day, 1, NEW.input_tokens,
                NEW.output_tokens, NEW.charged, NEW.cache_read_tokens, NEW.cache_write_tokens,
                NEW.cache_write_1h_tokens, NEW.reasoning_tokens)
        ON CONFLICT (account_id, day, route, user_id) DO UPDATE SET
            requests = u.requests + 1,
            input_tokens = u.input_tokens + excluded.input_tokens,
            output_tokens = u.output_tokens + excluded.output_tokens,
            charged = u.charged + excluded.charged,
            cache_read_tokens = u.cache_read_tokens + excluded.cache_read_tokens,
            cache_write_tokens = u.cache_write_tokens + excluded.cache_write_tokens,
            cache_write_1h_tokens = u.cache_write_1h_tokens + excluded.cache_write_1h_tokens,
            reasoning_tokens = u.reasoning_tokens + excluded.reasoning_tokens;
    INSERT INTO usage_totals AS t (account_id, day, route, requests, input_tokens, output_tokens,
                                   charged, cache_read_tokens, cache_write_tokens,
                                   cache_write_1h_tokens, reasoning_tokens)
        VALUES (NEW.account_id, utc_day, NEW.route, 1, NEW.input_tokens, NEW.output_tokens, NEW.charged,
                NEW.cache_read_tokens, NEW.cache_write_tokens, NEW.cache_write_1h_tokens,
                NEW.reasoning_tokens)
        ON CONFLICT (account_id, day, route) DO UPDATE SET
            requests = t.requests + 1,
            input_tokens = t.input_tokens + excluded.input_tokens,
            output_tokens = t.output_tokens + excluded.output_tokens,
            charged = t.charged + excluded.charged,
            cache_read_tokens = t.cache_read_tokens + excluded.cache_read_tokens,
            cache_write_tokens = t.cache_write_tokens + excluded.cache_write_tokens,
            cache_write_1h_tokens = t.cache_write_1h_tokens + excluded.cache_write_1h_tokens,
            reasoning_tokens = t.reasoning_tokens + excluded.reasoning_tokens;
    IF NEW.key_id IS NOT NULL THEN
        -- tpm counts billed tokens (reasoning is already inside output).
        UPDATE rate_windows SET tokens = tokens + NEW.input_tokens + NEW.cache_read_tokens
                + NEW.cache_write_tokens + NEW.cache_write_1h_tokens + NEW.output_tokens
            WHERE key_id = NEW.key_id AND minute = NEW.created_at / 60000;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER requests_settle AFTER INSERT ON requests
    FOR EACH ROW EXECUTE FUNCTION requests_settle();

CREATE TABLE idempotency (
    account_id       bigint  NOT NULL REFERENCES accounts (id),
    key              text    NOT NULL,
    request_hash     text    NOT NULL,
    response         bytea   NOT NULL,
    created_at       bigint  NOT NULL,
    PRIMARY KEY (account_id, key)
);
CREATE INDEX idempotency_time ON idempotency (created_at);
