-- Schema version 6: money coming in (orders paid through a provider, redemption codes)
-- and low-balance alerts. Self-contained: it only adds tables and triggers.
--
-- Invariants held here, not only in code:
--   * an order moves pending -> paid | expired, paid -> refunded, never back
--     (orders_status_moves); a paid order names its ledger entry;
--   * a provider's event is processed at most once: UNIQUE (provider, event_id);
--   * a redemption code is claimed once: claimed_at is written by one conditional UPDATE
--     and never changes again (codes_claim_once);
--   * one alert per crossing: UNIQUE (account_id, threshold, ledger_id).

CREATE TABLE orders (
    id               INTEGER PRIMARY KEY,
    public_id        TEXT    NOT NULL UNIQUE,                -- ord_…
    account_id       INTEGER NOT NULL REFERENCES accounts (id),
    package_id       TEXT    NOT NULL,
    amount_cents     INTEGER NOT NULL CHECK (amount_cents >= 0),
    currency         TEXT    NOT NULL,                       -- ISO 4217, lower case like Stripe
    quota_tokens     INTEGER NOT NULL CHECK (quota_tokens > 0), -- copied from the config at order time
    provider         TEXT    NOT NULL,                       -- 'stripe', …
    provider_ref     TEXT,                                   -- the Checkout Session id
    payment_ref      TEXT,                                   -- the PaymentIntent id, once paid
    status           TEXT    NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'paid', 'expired', 'refunded')),
    checkout_url     TEXT,
    paid_event_id    TEXT,
    ledger_id        TEXT,                                   -- the purchase entry
    refunded_cents   INTEGER NOT NULL DEFAULT 0 CHECK (refunded_cents >= 0),
    refunded_tokens  INTEGER NOT NULL DEFAULT 0 CHECK (refunded_tokens >= 0),
    refund_ledger_ids TEXT   NOT NULL DEFAULT '[]',          -- JSON array of ledg_… ids
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    CHECK (status NOT IN ('paid', 'refunded') OR ledger_id IS NOT NULL),
    CHECK (refunded_cents <= amount_cents AND refunded_tokens <= quota_tokens)
);
CREATE INDEX orders_account ON orders (account_id, id);
CREATE UNIQUE INDEX orders_provider_ref ON orders (provider, provider_ref) WHERE provider_ref IS NOT NULL;
CREATE INDEX orders_payment_ref ON orders (provider, payment_ref) WHERE payment_ref IS NOT NULL;

CREATE TRIGGER orders_status_moves BEFORE UPDATE OF status ON orders
WHEN NEW.status != OLD.status AND NOT (
    (OLD.status = 'pending' AND NEW.status IN ('paid', 'expired'))
    OR (OLD.status = 'paid' AND NEW.status = 'refunded'))
BEGIN
    SELECT RAISE(ABORT, 'an order cannot move back');
END;

CREATE TRIGGER orders_refunds_grow BEFORE UPDATE OF refunded_cents, refunded_tokens ON orders
WHEN NEW.refunded_cents < OLD.refunded_cents OR NEW.refunded_tokens < OLD.refunded_tokens
BEGIN
    SELECT RAISE(ABORT, 'a refund cannot be undone');
END;

CREATE TABLE payment_events (
    id               INTEGER PRIMARY KEY,
    provider         TEXT    NOT NULL,
    event_id         TEXT    NOT NULL,
    type             TEXT    NOT NULL,
    order_id         TEXT,                                   -- ord_… when one was matched
    outcome          TEXT    NOT NULL,                       -- credited, expired, refunded, mismatch: …, ignored: …
    ledger_id        TEXT,
    created_at       INTEGER NOT NULL,
    UNIQUE (provider, event_id)
);

CREATE TABLE redemption_codes (
    id               INTEGER PRIMARY KEY,
    public_id        TEXT    NOT NULL UNIQUE,                -- code_…
    digest           TEXT    NOT NULL UNIQUE,                -- SHA-256 of the normalised code
    package_id       TEXT    NOT NULL,
    quota_tokens     INTEGER NOT NULL CHECK (quota_tokens > 0),
    expires_at       INTEGER,
    claimed_by       INTEGER REFERENCES accounts (id),
    claimed_at       INTEGER,
    ledger_id        TEXT,
    created_at       INTEGER NOT NULL,
    CHECK ((claimed_at IS NULL) = (claimed_by IS NULL))
);

CREATE TRIGGER codes_claim_once BEFORE UPDATE OF claimed_at, claimed_by ON redemption_codes
WHEN OLD.claimed_at IS NOT NULL
BEGIN
    SELECT RAISE(ABORT, 'a redemption code is claimed once');
END;

-- Low-balance alerts: where a developer wants them, and the thresholds (quota tokens) for its
-- own balance ('account') and for each of its app users' balances ('users').
CREATE TABLE alert_settings (
    account_id       INTEGER PRIMARY KEY REFERENCES accounts (id),
    webhook_url      TEXT    NOT NULL,
    signing_secret   TEXT    NOT NULL,                       -- needed to sign, so kept as is
    updated_at       INTEGER NOT NULL
);

CREATE TABLE alert_thresholds (
    account_id       INTEGER NOT NULL REFERENCES accounts (id),
    scope            TEXT    NOT NULL CHECK (scope IN ('account', 'users')),
    threshold        INTEGER NOT NULL CHECK (threshold > 0),
    PRIMARY KEY (account_id, scope, threshold)
) WITHOUT ROWID;

-- How far the alert scanner has read the ledger; one row.
CREATE TABLE alert_cursor (
    id               INTEGER PRIMARY KEY CHECK (id = 1),
    ledger_row       INTEGER NOT NULL
);
INSERT INTO alert_cursor (id, ledger_row) SELECT 1, coalesce(max(id), 0) FROM ledger;

CREATE TABLE alert_deliveries (
    id               INTEGER PRIMARY KEY,
    public_id        TEXT    NOT NULL UNIQUE,                -- alrt_…, the event id the receiver sees
    account_id       INTEGER NOT NULL REFERENCES accounts (id), -- whose balance crossed
    developer_id     INTEGER NOT NULL REFERENCES accounts (id), -- whose URL it goes to
    threshold        INTEGER NOT NULL,
    ledger_id        TEXT    NOT NULL,                       -- the entry that crossed it
    balance_after    INTEGER NOT NULL,
    payload          BLOB    NOT NULL,
    status           TEXT    NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  INTEGER NOT NULL,
    last_error       TEXT,
    delivered_at     INTEGER,
    created_at       INTEGER NOT NULL,
    UNIQUE (account_id, threshold, ledger_id)
);
CREATE INDEX alert_deliveries_due ON alert_deliveries (status, next_attempt_at);
