-- Alert webhooks (issue 18): subscriptions and their deliveries (the notifier's retry queue).
-- Subscriptions live here only, not on spend.config: the notifier reads them from Postgres,
-- so signing secrets never travel on a topic (README "Alert webhooks").

CREATE TABLE IF NOT EXISTS webhooks (
    webhook_id  text PRIMARY KEY,
    url         text        NOT NULL,
    scopes      jsonb       NOT NULL,          -- scope patterns, e.g. ["team:*", "key:k1"]
    kinds       jsonb       NOT NULL,          -- alert kinds delivered
    format      text        NOT NULL CHECK (format IN ('json', 'slack')),
    secret      text,                          -- the signing secret (needed as is to sign); never logged or audited
    created_by  text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per alert x subscription: written (pending) before the notifier commits its offset,
-- so an alert is delivered, retried or given up even if every notifier dies. A replica claims a
-- due row by setting `locked_until` (a lease; FOR UPDATE SKIP LOCKED), so replicas never send
-- the same attempt twice and a dead one's claims come back when their lease ends.
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id              bigserial PRIMARY KEY,
    webhook_id      text        NOT NULL REFERENCES webhooks (webhook_id) ON DELETE CASCADE,
    event_id        text        NOT NULL,
    alert           jsonb       NOT NULL,
    status          text        NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    locked_until    timestamptz,
    last_attempt_at timestamptz,
    last_status     integer,                   -- HTTP status of the last attempt (NULL: no answer)
    last_error      text,
    history         jsonb       NOT NULL DEFAULT '[]',  -- the last 10 attempts: at, status, error
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    UNIQUE (webhook_id, event_id)
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due
    ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS webhook_deliveries_recent ON webhook_deliveries (webhook_id, id DESC);
