-- Control plane: registry, budgets, tokens, audit log and the transactional outbox.
-- Every change writes its row, one audit row and one outbox row in ONE transaction; the
-- entity's `version` is the id of that outbox row (the version readers of spend.config compare).

CREATE TABLE IF NOT EXISTS outbox (
    id          bigserial PRIMARY KEY,
    topic_key   text        NOT NULL,
    value       text,                      -- the record JSON exactly as produced; NULL = tombstone
    created_at  timestamptz NOT NULL DEFAULT now(),
    sent_at     timestamptz
);
CREATE INDEX IF NOT EXISTS outbox_unsent ON outbox (id) WHERE sent_at IS NULL;

CREATE TABLE IF NOT EXISTS orgs (
    org_id      text PRIMARY KEY,
    version     bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS teams (
    team_id     text PRIMARY KEY,
    org_id      text REFERENCES orgs (org_id) ON DELETE RESTRICT,
    version     bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS teams_org ON teams (org_id);

CREATE TABLE IF NOT EXISTS keys (
    key_id      text PRIMARY KEY,
    user_id     text,
    team_id     text REFERENCES teams (team_id) ON DELETE RESTRICT,
    version     bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS keys_team ON keys (team_id, key_id);

CREATE TABLE IF NOT EXISTS members (
    team_id     text NOT NULL REFERENCES teams (team_id) ON DELETE RESTRICT,
    user_id     text NOT NULL,
    version     bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (team_id, user_id)
);

-- A budget may sit on any scope, registered or not (spend is counted for every scope).
-- `limits` NULL and `[]` both mean "no limit here" (CONTRACT §3, seed 004).
CREATE TABLE IF NOT EXISTS budgets (
    scope       text PRIMARY KEY,          -- canonical "kind:id" / "kind:a/b"
    kind        text        NOT NULL,
    part1       text        NOT NULL,
    part2       text,
    limits      jsonb,
    tz          text        NOT NULL DEFAULT 'UTC',
    version     bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS budgets_parts ON budgets (kind, part1);

CREATE TABLE IF NOT EXISTS tokens (
    token_id    text PRIMARY KEY,
    hash        text        NOT NULL UNIQUE,   -- sha256 hex; the token itself is never stored
    role        text        NOT NULL CHECK (role IN ('admin', 'team_admin', 'viewer', 'gateway')),
    team_id     text,
    revoked     boolean     NOT NULL DEFAULT false,
    created_by  text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    version     bigint      NOT NULL
);

CREATE TABLE IF NOT EXISTS audit (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text        NOT NULL,          -- token id of the caller
    actor_role  text        NOT NULL,
    action      text        NOT NULL,          -- e.g. put_budget, delete_key, mint_token
    target      text        NOT NULL,          -- the spend.config key of the entity
    before      jsonb,
    after       jsonb,
    outbox_id   bigint
);
