-- Schema version 5: dashboard sign-in.
--
-- Nothing here is a credential in clear: passwords are scrypt hashes with a per-login salt,
-- invitation tokens and session ids are stored as SHA-256 digests (they carry 256 bits of
-- randomness, so a fast digest cannot be brute-forced). Times are unix milliseconds.

CREATE TABLE dashboard_logins (
    id               INTEGER PRIMARY KEY,
    public_id        TEXT    NOT NULL UNIQUE,
    email            TEXT    NOT NULL UNIQUE,          -- lower case
    account_id       INTEGER NOT NULL REFERENCES accounts (id),
    role             TEXT    NOT NULL CHECK (role IN ('developer', 'operator')),
    password_hash    TEXT    NOT NULL,                 -- scrypt$n$r$p$salt$hash (base64)
    created_at       INTEGER NOT NULL,
    password_set_at  INTEGER NOT NULL,
    disabled_at      INTEGER
);

CREATE TABLE dashboard_invitations (
    id               INTEGER PRIMARY KEY,
    public_id        TEXT    NOT NULL UNIQUE,
    token_digest     TEXT    NOT NULL UNIQUE,
    email            TEXT    NOT NULL,
    account_id       INTEGER NOT NULL REFERENCES accounts (id),
    role             TEXT    NOT NULL CHECK (role IN ('developer', 'operator')),
    created_at       INTEGER NOT NULL,
    expires_at       INTEGER NOT NULL,
    used_at          INTEGER
);
CREATE INDEX dashboard_invitations_time ON dashboard_invitations (created_at);

CREATE TABLE dashboard_sessions (
    id               INTEGER PRIMARY KEY,
    public_id        TEXT    NOT NULL UNIQUE,
    token_digest     TEXT    NOT NULL UNIQUE,
    login_id         INTEGER NOT NULL REFERENCES dashboard_logins (id),
    created_at       INTEGER NOT NULL,
    last_seen_at     INTEGER NOT NULL,
    idle_timeout_ms  INTEGER NOT NULL CHECK (idle_timeout_ms > 0),
    expires_at       INTEGER NOT NULL,                 -- absolute: no activity extends it
    revoked_at       INTEGER,
    address          TEXT    NOT NULL DEFAULT ''
);
CREATE INDEX dashboard_sessions_login ON dashboard_sessions (login_id);

-- Failed sign-ins in a fixed window, per account (email) and per client address.
CREATE TABLE dashboard_signin_failures (
    scope            TEXT    NOT NULL CHECK (scope IN ('account', 'address')),
    subject          TEXT    NOT NULL,
    window_start     INTEGER NOT NULL,
    failures         INTEGER NOT NULL CHECK (failures > 0),
    PRIMARY KEY (scope, subject)
) WITHOUT ROWID;

-- A key's last use (the dashboard's key list) without scanning the account's requests.
CREATE INDEX requests_key_time ON requests (key_id, created_at);
