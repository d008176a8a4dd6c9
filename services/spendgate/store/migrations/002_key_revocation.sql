-- Deleting a key revokes it (CONTRACT §4, issue 11): the row stays, with its team and user, so
-- its spend is still charged to them and the gate denies it until an admin registers it again.
ALTER TABLE keys ADD COLUMN IF NOT EXISTS revoked boolean NOT NULL DEFAULT false;
ALTER TABLE keys ADD COLUMN IF NOT EXISTS revoked_at timestamptz;

-- A revoked key keeps naming its team after that team is deleted (and a re-created team of the
-- same id finds it again, still revoked). Live keys still block a team's deletion: the control
-- plane checks that, under the team row's lock, as put_key takes the same row FOR SHARE.
ALTER TABLE keys DROP CONSTRAINT IF EXISTS keys_team_id_fkey;
