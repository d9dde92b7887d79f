-- PostgreSQL store, schema version 3 (mirrors SQLite schema v6): money coming in (orders
-- paid through a provider, redemption codes) and low-balance alerts.
--
-- Invariants held here, not only in code (as in schema_v6.sql):
--   * an order moves pending -> paid | expired, paid -> refunded, never back
--     (orders_status_moves); a paid order names its ledger entry; a refund never shrinks;
--   * a provider's event is processed at most once: UNIQUE (provider, event_id);
--   * a redemption code is claimed once (codes_claim_once);
--   * one alert per crossing: UNIQUE (account_id, threshold, ledger_id).
--
-- One difference: crossings are not found by reading the ledger past an id cursor (ids from
-- a sequence commit out of order here), but recorded by a trigger on the ledger insert, in
-- the same transaction; the scanner turns them into deliveries. See docs/postgres.md.

CREATE TABLE orders (
    id               bigserial PRIMARY KEY,
    public_id        text    NOT NULL UNIQUE,
    account_id       bigint  NOT NULL REFERENCES accounts (id),
    package_id       text    NOT NULL,
    amount_cents     bigint  NOT NULL CHECK (amount_cents >= 0),
    currency         text    NOT NULL,
    quota_tokens     bigint  NOT NULL CHECK (quota_tokens > 0),
    provider         text    NOT NULL,
    provider_ref     text,
    payment_ref      text,
    status           text    NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'paid', 'expired', 'refunded')),
    checkout_url     text,
    paid_event_id    text,
    ledger_id        text,
    refunded_cents   bigint  NOT NULL DEFAULT 0 CHECK (refunded_cents >= 0),
    refunded_tokens  bigint  NOT NULL DEFAULT 0 CHECK (refunded_tokens >= 0),
    refund_ledger_ids text   NOT NULL DEFAULT '[]',          -- JSON array of ledg_… ids
    created_at       bigint  NOT NULL,
    updated_at       bigint  NOT NULL,
    CHECK (status NOT IN ('paid', 'refunded') OR ledger_id IS NOT NULL),
    CHECK (refunded_cents <= amount_cents AND refunded_tokens <= quota_tokens)
);
CREATE INDEX orders_account ON orders (account_id, id);
CREATE UNIQUE INDEX orders_provider_ref ON orders (provider, provider_ref) WHERE provider_ref IS NOT NULL;
CREATE INDEX orders_payment_ref ON orders (provider, payment_ref) WHERE payment_ref IS NOT NULL;

CREATE FUNCTION orders_status_moves() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status <> OLD.status AND NOT (
        (OLD.status = 'pending' AND NEW.status IN ('paid', 'expired'))
        OR (OLD.status = 'paid' AND NEW.status = 'refunded')) THEN
        RAISE EXCEPTION 'an order cannot move back';
    END IF;
    IF NEW.refunded_cents < OLD.refunded_cents OR NEW.refunded_tokens < OLD.refunded_tokens THEN
        RAISE EXCEPTION 'a refund cannot be undone';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER orders_status_moves BEFORE UPDATE ON orders
    FOR EACH ROW EXECUTE FUNCTION orders_status_moves();

CREATE TABLE payment_events (
    id               bigserial PRIMARY KEY,
    provider         text    NOT NULL,
    event_id         text    NOT NULL,
    type             text    NOT NULL,
    order_id         text,
    outcome          text    NOT NULL,
    ledger_id        text,
    created_at       bigint  NOT NULL,
    UNIQUE (provider, event_id)
);

CREATE TABLE redemption_codes (
    id               bigserial PRIMARY KEY,
    public_id        text    NOT NULL UNIQUE,
    digest           text    NOT NULL UNIQUE,
    package_id       text    NOT NULL,
    quota_tokens     bigint  NOT NULL CHECK (quota_tokens > 0),
    expires_at       bigint,
    claimed_by       bigint  REFERENCES accounts (id),
    claimed_at       bigint,
    ledger_id        text,
    created_at       bigint  NOT NULL,
    CHECK ((claimed_at IS NULL) = (claimed_by IS NULL))
);

CREATE FUNCTION codes_claim_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.claimed_at IS NOT NULL AND (NEW.claimed_at IS DISTINCT FROM OLD.claimed_at
            OR NEW.claimed_by IS DISTINCT FROM OLD.claimed_by) THEN
        RAISE EXCEPTION 'a redemption code is claimed once';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER codes_claim_once BEFORE UPDATE ON redemption_codes
    FOR EACH ROW EXECUTE FUNCTION codes_claim_once();

CREATE TABLE alert_settings (
    account_id       bigint  PRIMARY KEY REFERENCES accounts (id),
    webhook_url      text    NOT NULL,
    signing_secret   text    NOT NULL,
    updated_at       bigint  NOT NULL
);

CREATE TABLE alert_thresholds (
    account_id       bigint  NOT NULL REFERENCES accounts (id),
    scope            text    NOT NULL CHECK (scope IN ('account', 'users')),
    threshold        bigint  NOT NULL CHECK (threshold > 0),
    PRIMARY KEY (account_id, scope, threshold)
);

-- Crossings recorded with the ledger entry that made them, waiting for the scanner to build
-- their delivery (it deletes them in the same transaction as it inserts the delivery).
CREATE TABLE alert_crossings (
    id               bigserial PRIMARY KEY,
    account_id       bigint  NOT NULL,
    developer_id     bigint  NOT NULL,
    threshold        bigint  NOT NULL,
    ledger_id        text    NOT NULL,
    balance_before   bigint  NOT NULL,
    balance_after    bigint  NOT NULL,
    created_at       bigint  NOT NULL
);

CREATE FUNCTION ledger_alert_crossings() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO alert_crossings (account_id, developer_id, threshold, ledger_id,
                                 balance_before, balance_after, created_at)
    SELECT a.id, d.id, t.threshold, NEW.public_id, NEW.balance_after - NEW.amount,
           NEW.balance_after, NEW.created_at
    FROM accounts a
    JOIN accounts d ON d.id = coalesce(a.parent_id, a.id)
    JOIN alert_thresholds t ON t.account_id = d.id
         AND t.scope = CASE a.kind WHEN 'developer' THEN 'account' ELSE 'users' END
    WHERE a.id = NEW.account_id
      AND t.threshold <= NEW.balance_after - NEW.amount AND t.threshold > NEW.balance_after;
    RETURN NULL;
END $$;
CREATE TRIGGER ledger_alert_crossings AFTER INSERT ON ledger
    FOR EACH ROW WHEN (NEW.amount < 0) EXECUTE FUNCTION ledger_alert_crossings();

CREATE TABLE alert_deliveries (
    id               bigserial PRIMARY KEY,
    public_id        text    NOT NULL UNIQUE,
    account_id       bigint  NOT NULL REFERENCES accounts (id),
    developer_id     bigint  NOT NULL REFERENCES accounts (id),
    threshold        bigint  NOT NULL,
    ledger_id        text    NOT NULL,
    balance_after    bigint  NOT NULL,
    payload          bytea   NOT NULL,
    status           text    NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  bigint  NOT NULL,
    last_error       text,
    delivered_at     bigint,
    created_at       bigint  NOT NULL,
    UNIQUE (account_id, threshold, ledger_id)
);
CREATE INDEX alert_deliveries_due ON alert_deliveries (status, next_attempt_at);
