-- quota-proxy store, schema version 1.
--
-- Money invariants live here, next to the data, so that no code path can skip them:
--   * balances change only through a ledger row (accounts_balance_follows_ledger);
--   * the ledger is append-only and each row's balance_after = previous balance + amount;
--   * a hold is taken only if it fits the available balance (balance - held), checked and
--     applied inside the one INSERT statement, which SQLite runs under its write lock;
--   * settling a request is one INSERT into requests: its trigger releases the hold, writes
--     the charge's ledger row and the daily usage roll-up in the same statement.
-- Times are unix milliseconds.

CREATE TABLE accounts (
    id               INTEGER PRIMARY KEY,
    public_id        TEXT    NOT NULL UNIQUE,
    kind             TEXT    NOT NULL CHECK (kind IN ('developer', 'user')),
    name             TEXT    NOT NULL,
    parent_id        INTEGER REFERENCES accounts (id),
    billing_mode     TEXT    NOT NULL DEFAULT 'user' CHECK (billing_mode IN ('user', 'developer')),
    balance          INTEGER NOT NULL DEFAULT 0,
    held             INTEGER NOT NULL DEFAULT 0 CHECK (held >= 0),
    created_at       INTEGER NOT NULL,
    CHECK ((kind = 'developer') = (parent_id IS NULL))
);
CREATE UNIQUE INDEX accounts_developer_name ON accounts (name) WHERE kind = 'developer';
CREATE UNIQUE INDEX accounts_user_name ON accounts (parent_id, name) WHERE kind = 'user';

CREATE TABLE api_keys (
    id               INTEGER PRIMARY KEY,
    public_id        TEXT    NOT NULL UNIQUE,
    account_id       INTEGER NOT NULL REFERENCES accounts (id),
    kind             TEXT    NOT NULL CHECK (kind IN ('live', 'secret')),
    name             TEXT    NOT NULL DEFAULT '',
    digest           TEXT    NOT NULL UNIQUE,
    prefix           TEXT    NOT NULL,
    routes           TEXT,
    allow_community  INTEGER NOT NULL DEFAULT 1,
    expires_at       INTEGER,
    revoked_at       INTEGER,
    created_at       INTEGER NOT NULL
);
CREATE INDEX api_keys_account ON api_keys (account_id);
CREATE INDEX api_keys_prefix ON api_keys (prefix);

CREATE TABLE ledger (
    id               INTEGER PRIMARY KEY,
    public_id        TEXT    NOT NULL UNIQUE,
    account_id       INTEGER NOT NULL REFERENCES accounts (id),
    amount           INTEGER NOT NULL CHECK (amount != 0),
    balance_after    INTEGER NOT NULL,
    kind             TEXT    NOT NULL
                     CHECK (kind IN ('purchase', 'credit', 'grant', 'charge', 'refund', 'adjustment')),
    request_id       TEXT,
    idempotency_key  TEXT,
    related_id       TEXT,
    description      TEXT    NOT NULL DEFAULT '',
    created_at       INTEGER NOT NULL
);
CREATE INDEX ledger_account ON ledger (account_id, id);

CREATE TRIGGER ledger_balance_after_is_exact BEFORE INSERT ON ledger
WHEN NEW.balance_after != (SELECT balance FROM accounts WHERE id = NEW.account_id) + NEW.amount
BEGIN
    SELECT RAISE(ABORT, 'ledger balance_after does not follow the balance');
END;

CREATE TRIGGER ledger_moves_balance AFTER INSERT ON ledger
BEGIN
    UPDATE accounts SET balance = NEW.balance_after WHERE id = NEW.account_id;
END;

CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
BEGIN
    SELECT RAISE(ABORT, 'the ledger is append-only');
END;

CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
BEGIN
    SELECT RAISE(ABORT, 'the ledger is append-only');
END;

CREATE TRIGGER accounts_balance_follows_ledger BEFORE UPDATE OF balance ON accounts
WHEN NEW.balance != OLD.balance AND NEW.balance IS NOT (
    SELECT balance_after FROM ledger WHERE account_id = NEW.id ORDER BY id DESC LIMIT 1)
BEGIN
    SELECT RAISE(ABORT, 'a balance changes only through a ledger entry');
END;

CREATE TABLE holds (
    id               INTEGER PRIMARY KEY,
    account_id       INTEGER NOT NULL REFERENCES accounts (id),
    amount           INTEGER NOT NULL CHECK (amount > 0),
    request_id       TEXT    NOT NULL,
    owner            TEXT    NOT NULL,
    expires_at       INTEGER NOT NULL,
    created_at       INTEGER NOT NULL
);
CREATE INDEX holds_expiry ON holds (expires_at);
CREATE INDEX holds_owner ON holds (owner);

CREATE TRIGGER holds_fit_available BEFORE INSERT ON holds
WHEN NEW.amount > (SELECT balance - held FROM accounts WHERE id = NEW.account_id)
BEGIN
    SELECT RAISE(ABORT, 'insufficient_balance');
END;

CREATE TRIGGER holds_reserve AFTER INSERT ON holds
BEGIN
    UPDATE accounts SET held = held + NEW.amount WHERE id = NEW.account_id;
END;

CREATE TRIGGER holds_release AFTER DELETE ON holds
BEGIN
    UPDATE accounts SET held = held - OLD.amount WHERE id = OLD.account_id;
END;

CREATE TABLE requests (
    id                 INTEGER PRIMARY KEY,
    request_id         TEXT    NOT NULL,
    account_id         INTEGER NOT NULL REFERENCES accounts (id),
    user_id            INTEGER REFERENCES accounts (id),
    charged_account_id INTEGER NOT NULL REFERENCES accounts (id),
    key_id             INTEGER,
    hold_id            INTEGER,
    route              TEXT    NOT NULL,
    upstream_model     TEXT    NOT NULL,
    input_tokens       INTEGER NOT NULL CHECK (input_tokens >= 0),
    output_tokens      INTEGER NOT NULL CHECK (output_tokens >= 0),
    multiplier         TEXT    NOT NULL,
    charged            INTEGER NOT NULL CHECK (charged >= 0),
    estimated          INTEGER NOT NULL DEFAULT 0,
    outcome            TEXT    NOT NULL,
    status             INTEGER NOT NULL,
    ledger_id          TEXT,
    created_at         INTEGER NOT NULL
);
CREATE UNIQUE INDEX requests_request_id ON requests (request_id);
CREATE INDEX requests_account_time ON requests (account_id, created_at);

CREATE TABLE usage_daily (
    account_id       INTEGER NOT NULL,
    user_id          INTEGER NOT NULL DEFAULT 0,
    route            TEXT    NOT NULL,
    day              TEXT    NOT NULL,
    requests         INTEGER NOT NULL DEFAULT 0,
    input_tokens     INTEGER NOT NULL DEFAULT 0,
    output_tokens    INTEGER NOT NULL DEFAULT 0,
    charged          INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (account_id, day, route, user_id)
) WITHOUT ROWID;

CREATE TRIGGER requests_settle AFTER INSERT ON requests
BEGIN
    DELETE FROM holds WHERE id = NEW.hold_id;
    INSERT INTO ledger (public_id, account_id, amount, balance_after, kind, request_id,
                        description, created_at)
        SELECT NEW.ledger_id, NEW.charged_account_id, -NEW.charged, balance - NEW.charged,
               'charge', NEW.request_id, NEW.route, NEW.created_at
        FROM accounts WHERE id = NEW.charged_account_id AND NEW.charged > 0;
    INSERT INTO usage_daily (account_id, user_id, route, day, requests, input_tokens,
                             output_tokens, charged)
        VALUES (NEW.account_id, coalesce(NEW.user_id, 0), NEW.route,
                date(NEW.created_at / 1000, 'unixepoch'), 1, NEW.input_tokens,
                NEW.output_tokens, NEW.charged)
        ON CONFLICT (account_id, day, route, user_id) DO UPDATE SET
            requests = requests + 1,
            input_tokens = input_tokens + excluded.input_tokens,
            output_tokens = output_tokens + excluded.output_tokens,
            charged = charged + excluded.charged;
END;

CREATE TABLE idempotency (
    account_id       INTEGER NOT NULL REFERENCES accounts (id),
    key              TEXT    NOT NULL,
    request_hash     TEXT    NOT NULL,
    response         BLOB    NOT NULL,
    created_at       INTEGER NOT NULL,
    PRIMARY KEY (account_id, key)
);
CREATE INDEX idempotency_time ON idempotency (created_at);
