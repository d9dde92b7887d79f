-- PostgreSQL store, schema version 2 (mirrors SQLite schema v5): dashboard sign-in.
--
-- Nothing here is a credential in clear: passwords are scrypt hashes with a per-login salt,
-- invitation tokens and session ids are stored as SHA-256 digests. Times are unix ms.

CREATE TABLE dashboard_logins (
    id               bigserial PRIMARY KEY,
    public_id        text    NOT NULL UNIQUE,
    email            text    NOT NULL UNIQUE,          -- lower case
    account_id       bigint  NOT NULL REFERENCES accounts (id),
    role             text    NOT NULL CHECK (role IN ('developer', 'operator')),
    password_hash    text    NOT NULL,
    created_at       bigint  NOT NULL,
    password_set_at  bigint  NOT NULL,
    disabled_at      bigint
);

CREATE TABLE dashboard_invitations (
    id               bigserial PRIMARY KEY,
    public_id        text    NOT NULL UNIQUE,
    token_digest     text    NOT NULL UNIQUE,
    email            text    NOT NULL,
    account_id       bigint  NOT NULL REFERENCES accounts (id),
    role             text    NOT NULL CHECK (role IN ('developer', 'operator')),
    created_at       bigint  NOT NULL,
    expires_at       bigint  NOT NULL,
    used_at          bigint
);
CREATE INDEX dashboard_invitations_time ON dashboard_invitations (created_at);

CREATE TABLE dashboard_sessions (
    id               bigserial PRIMARY KEY,
    public_id        text    NOT NULL UNIQUE,
    token_digest     text    NOT NULL UNIQUE,
    login_id         bigint  NOT NULL REFERENCES dashboard_logins (id),
    created_at       bigint  NOT NULL,
    last_seen_at     bigint  NOT NULL,
    idle_timeout_ms  bigint  NOT NULL CHECK (idle_timeout_ms > 0),
    expires_at       bigint  NOT NULL,
    revoked_at       bigint,
    address          text    NOT NULL DEFAULT ''
);
CREATE INDEX dashboard_sessions_login ON dashboard_sessions (login_id);

CREATE TABLE dashboard_signin_failures (
    scope            text    NOT NULL CHECK (scope IN ('account', 'address')),
    subject          text    NOT NULL,
    window_start     bigint  NOT NULL,
    failures         integer NOT NULL CHECK (failures > 0),
    PRIMARY KEY (scope, subject)
);

CREATE INDEX requests_key_time ON requests (key_id, created_at);
