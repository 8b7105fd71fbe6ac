//! The database schema as an ordered list of migrations. `PRAGMA user_version` records how many ran.
//!
//! Append new migrations at the end; never edit one that has shipped (databases in the field already
//! ran it). A database whose `user_version` exceeds `MIGRATIONS.len()` was written by a newer tilewise
//! and is refused by `Store::open` before anything touches it.

use rusqlite_migration::{Migrations, M};

/// Schema version 1: devices, models, sessions, candidates, measurements, the shape memo, best, events.
const V1: &str = r#"
CREATE TABLE devices (
    fingerprint TEXT PRIMARY KEY,
    info_json   TEXT NOT NULL,
    first_seen  TEXT NOT NULL,
    last_seen   TEXT NOT NULL
);

CREATE TABLE models (
    fingerprint TEXT PRIMARY KEY,
    path        TEXT,
    config_json TEXT NOT NULL,
    first_seen  TEXT NOT NULL,
    last_seen   TEXT NOT NULL
);

CREATE TABLE sessions (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    device      TEXT NOT NULL,
    model       TEXT NOT NULL,
    mlx         TEXT NOT NULL,
    backend     TEXT NOT NULL,
    seed        INTEGER NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('created','running','paused','stopped','finished','failed')),
    reason      TEXT,
    budget_json TEXT NOT NULL,
    evaluations INTEGER NOT NULL DEFAULT 0,
    failures    INTEGER NOT NULL DEFAULT 0,
    promotions  INTEGER NOT NULL DEFAULT 0,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE INDEX sessions_target ON sessions (device, model, mlx, backend);

CREATE TABLE candidates (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id     INTEGER NOT NULL REFERENCES sessions(id),
    hash           TEXT NOT NULL,
    policy_json    TEXT NOT NULL,
    parents_json   TEXT NOT NULL DEFAULT '[]',
    island         INTEGER NOT NULL,
    generation     INTEGER NOT NULL,
    origin         TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('pending','measuring','measured','failed')),
    failure_reason TEXT,
    created_at     TEXT NOT NULL,
    updated_at     TEXT NOT NULL
);
CREATE INDEX candidates_session ON candidates (session_id, status);
CREATE INDEX candidates_hash ON candidates (session_id, hash);

CREATE TABLE measurements (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    candidate_id INTEGER NOT NULL REFERENCES candidates(id),
    session_id   INTEGER NOT NULL REFERENCES sessions(id),
    at           TEXT NOT NULL,
    correct      INTEGER NOT NULL,
    ratio        REAL,
    lo           REAL,
    hi           REAL,
    gate_json    TEXT NOT NULL,
    detail_json  TEXT NOT NULL
);
CREATE INDEX measurements_candidate ON measurements (candidate_id);
CREATE INDEX measurements_session ON measurements (session_id);

CREATE TABLE samples (
    measurement_id INTEGER NOT NULL REFERENCES measurements(id),
    workload       TEXT NOT NULL,
    pair           INTEGER NOT NULL,
    arm            TEXT NOT NULL CHECK (arm IN ('stock','candidate')),
    seconds        REAL NOT NULL,
    extra_json     TEXT,
    PRIMARY KEY (measurement_id, workload, pair, arm)
) WITHOUT ROWID;

CREATE TABLE shape_memo (
    device          TEXT NOT NULL,
    mlx             TEXT NOT NULL,
    backend         TEXT NOT NULL,
    m               INTEGER NOT NULL,
    n               INTEGER NOT NULL,
    k               INTEGER NOT NULL,
    dtype           TEXT NOT NULL,
    plan_hash       TEXT NOT NULL,
    plan_json       TEXT NOT NULL,
    stock_median_s  REAL NOT NULL,
    plan_median_s   REAL NOT NULL,
    ratio           REAL NOT NULL,
    lo              REAL,
    hi              REAL,
    samples         INTEGER NOT NULL,
    updated_at      TEXT NOT NULL,
    PRIMARY KEY (device, mlx, backend, m, n, k, dtype, plan_hash)
);

CREATE TABLE best (
    device       TEXT NOT NULL,
    model        TEXT NOT NULL,
    mlx          TEXT NOT NULL,
    backend      TEXT NOT NULL,
    hash         TEXT NOT NULL,
    policy_json  TEXT NOT NULL,
    ratio        REAL NOT NULL,
    lo           REAL NOT NULL,
    hi           REAL NOT NULL,
    session_id   INTEGER REFERENCES sessions(id),
    candidate_id INTEGER REFERENCES candidates(id),
    promoted_at  TEXT NOT NULL,
    PRIMARY KEY (device, model, mlx, backend)
);

CREATE TABLE best_history (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    device        TEXT NOT NULL,
    model         TEXT NOT NULL,
    mlx           TEXT NOT NULL,
    backend       TEXT NOT NULL,
    hash          TEXT NOT NULL,
    policy_json   TEXT NOT NULL,
    ratio         REAL NOT NULL,
    lo            REAL NOT NULL,
    hi            REAL NOT NULL,
    session_id    INTEGER REFERENCES sessions(id),
    candidate_id  INTEGER REFERENCES candidates(id),
    replaced_hash TEXT,
    promoted_at   TEXT NOT NULL
);
CREATE INDEX best_history_model ON best_history (model, id);

CREATE TABLE events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    at         TEXT NOT NULL,
    kind       TEXT NOT NULL,
    session_id INTEGER,
    data_json  TEXT NOT NULL
);
CREATE INDEX events_session ON events (session_id, id);

CREATE TABLE worker_failures (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    at           TEXT NOT NULL,
    session_id   INTEGER REFERENCES sessions(id),
    candidate_id INTEGER REFERENCES candidates(id),
    kind         TEXT NOT NULL,
    message      TEXT NOT NULL,
    exit_code    INTEGER,
    stderr_tail  TEXT
);
CREATE INDEX worker_failures_session ON worker_failures (session_id, id);
"#;

/// Schema version 2: the evolution engine's resumable state per session (store/search.rs).
const V2: &str = r#"
CREATE TABLE search_state (
    session_id INTEGER PRIMARY KEY REFERENCES sessions(id),
    state_json TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
"#;

/// Schema version 3: a proven policy's summary in words and per workload (store/best.rs
/// `PolicySummary`); NULL for promotions recorded before.
const V3: &str = r#"
ALTER TABLE best ADD COLUMN summary_json TEXT;
ALTER TABLE best_history ADD COLUMN summary_json TEXT;
"#;

/// Schema version 4: what became of a proven policy after its promotion (store/best.rs). History rows
/// gain a `kind` — `promotion`, `remeasure` (the policy measured again: in a fresh worker right after
/// its promotion, in later sessions, on later days) or `demotion` (a re-measurement found it slower
/// than stock: the previous best or native is served again) — and a `reason`; the best row keeps when
/// it was last re-measured.
const V4: &str = r#"
ALTER TABLE best_history ADD COLUMN kind TEXT NOT NULL DEFAULT 'promotion';
ALTER TABLE best_history ADD COLUMN reason TEXT;
ALTER TABLE best ADD COLUMN remeasured_at TEXT;
"#;

/// Schema version 5: who uses what (store/usage.rs). Models gain the name they were loaded by, their
/// weight type and when they were last used; `fetches` holds one row per process and model that
/// fetched a policy (pid 0: unknown), `usage` the merged usage reports of one process, model and
/// UTC day. Both are pruned by age and capped in rows.
const V5: &str = r#"
ALTER TABLE models ADD COLUMN name TEXT;
ALTER TABLE models ADD COLUMN dtype TEXT;
ALTER TABLE models ADD COLUMN last_used TEXT;

CREATE TABLE fetches (
    client      TEXT NOT NULL,
    pid         INTEGER NOT NULL,
    model       TEXT NOT NULL,
    model_name  TEXT,
    source      TEXT NOT NULL,
    policy_hash TEXT NOT NULL,
    fetches     INTEGER NOT NULL,
    first_at    TEXT NOT NULL,
    last_at     TEXT NOT NULL,
    PRIMARY KEY (client, pid, model)
);
CREATE INDEX fetches_last_at ON fetches (last_at);

CREATE TABLE usage (
    model            TEXT NOT NULL,
    client           TEXT NOT NULL,
    pid              INTEGER NOT NULL,
    day              TEXT NOT NULL,
    reports          INTEGER NOT NULL,
    period_s         REAL NOT NULL,
    generations_json TEXT NOT NULL,
    shapes_json      TEXT NOT NULL,
    first_at         TEXT NOT NULL,
    last_at          TEXT NOT NULL,
    PRIMARY KEY (model, client, pid, day)
);
CREATE INDEX usage_last_at ON usage (last_at);
"#;

/// Schema version 6: policies imported from other machines' bundles (share/, store/imports.rs), one
/// row per (policy hash, target), with what this machine made of each: `pending` until verified
/// here, then `verified` or `rejected` (with the reason); `starting_point` for one proven for
/// another model, MLX version or backend (it may seed a search, never be served).
const V6: &str = r#"
CREATE TABLE imports (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    hash          TEXT NOT NULL,
    model         TEXT NOT NULL,
    mlx           TEXT NOT NULL,
    backend       TEXT NOT NULL,
    from_device   TEXT NOT NULL,
    from_chip     TEXT,
    policy_json   TEXT NOT NULL,
    evidence_json TEXT NOT NULL,
    bundle_hash   TEXT NOT NULL,
    source        TEXT NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('pending','verified','rejected','starting_point')),
    reason        TEXT,
    imported_at   TEXT NOT NULL,
    decided_at    TEXT,
    session_id    INTEGER,
    UNIQUE (hash, model, mlx, backend)
);
CREATE INDEX imports_state ON imports (state, model);
ALTER TABLE best ADD COLUMN origin TEXT;
"#;

/// Schema version 7: a promotion's history row keeps where its policy came from (`best.origin`),
/// so that a demotion which serves an imported policy again serves it with its label.
const V7: &str = r#"
ALTER TABLE best_history ADD COLUMN origin TEXT;
"#;

/// Every migration, oldest first.
pub(crate) fn migrations() -> Migrations<'static> {
    Migrations::new(vec![M::up(V1), M::up(V2), M::up(V3), M::up(V4), M::up(V5), M::up(V6), M::up(V7)])
}

/// The schema version this binary writes (= number of migrations).
pub const SCHEMA_VERSION: u32 = 7;

#[cfg(test)]
mod tests {
    #[test]
    fn migrations_are_valid_and_version_matches() {
        super::migrations().validate().unwrap();
        let mut conn = rusqlite::Connection::open_in_memory().unwrap();
        super::migrations().to_latest(&mut conn).unwrap();
        let v: u32 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(v, super::SCHEMA_VERSION);
    }

    /// A database written before history rows had an origin opens with its rows intact (origin
    /// NULL: found here, which is what every row before imports existed was).
    #[test]
    fn a_version_6_history_migrates_with_its_rows() {
        let mut conn = rusqlite::Connection::open_in_memory().unwrap();
        super::migrations().to_version(&mut conn, 6).unwrap();
        conn.execute(
            "INSERT INTO best_history (device, model, mlx, backend, hash, policy_json, ratio, lo, hi, promoted_at)
             VALUES ('d', 'm', '0.32.4', 'cpu', 'sha256:a', '{}', 1.2, 1.1, 1.3, '2026-12-01T00:00:00Z')",
            [],
        )
        .unwrap();
        super::migrations().to_latest(&mut conn).unwrap();
        let row: (String, f64, Option<String>) =
            conn.query_row("SELECT hash, ratio, origin FROM best_history", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap();
        assert_eq!(row, ("sha256:a".to_string(), 1.2, None));
    }
}
