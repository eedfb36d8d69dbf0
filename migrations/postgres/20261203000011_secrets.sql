-- Keys ferry makes for itself and every instance shares, such as the one download links are
-- signed with: the first instance to start stores one, the others read it.
CREATE TABLE secrets (
    name       TEXT PRIMARY KEY,
    value      BYTEA NOT NULL,
    created_at BIGINT NOT NULL
);
