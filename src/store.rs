//! What narpost needs to know about local store paths: NarHash, NarSize, references,
//! deriver, signatures, and closures.
//!
//! # Where it comes from
//!
//! The pipeline asks for thousands of paths at once (a NixOS system closure is 5,000 to
//! 20,000 paths), so one process per path (`nix-store -q`) is out: at ~5 ms a process that is
//! a minute of planning. Two sources are fast enough:
//!
//! 1. **Nix's SQLite database, read-only** (`/nix/var/nix/db/db.sqlite`, or under
//!    `$NIX_STATE_DIR`). One prepared statement per path, microseconds each: 10,000 paths take
//!    tens of milliseconds. The database is in WAL mode, so it is opened with `mode=ro` (never
//!    `immutable=1`, which ignores the WAL and would read stale rows while Nix runs) and never
//!    written. This works for root, which is how the hook, the daemon and CI sidecars run.
//!    A non-root user can open it too as long as the `-shm` file exists and is readable,
//!    which is the case on a multi-user install while the daemon runs.
//! 2. **`nix path-info --json --recursive`**, one process for the whole request, when the
//!    database cannot be opened (a non-root user whose store is only reachable through the
//!    daemon socket). Slower to start (~50 ms) but still one process for any number of paths.
//!
//! The database is the default because it is the faster and the more exact of the two (it
//! gives the registration time `watch-store` uses to rescan after an inotify overflow).
//! The daemon protocol would also work for non-root users, but it is a versioned binary
//! protocol whose upkeep is not worth it while the two sources above cover every case.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde::Deserialize;

use crate::format::hash::Sha256;
use crate::format::store_path::StorePath;

/// Everything the pipeline needs to know about one valid store path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub path: StorePath,
    pub nar_hash: Sha256,
    pub nar_size: u64,
    pub references: BTreeSet<StorePath>,
    pub deriver: Option<StorePath>,
    /// Signatures the store already holds (e.g. from cache.nixos.org), kept in the narinfo.
    pub sigs: Vec<String>,
    pub ca: Option<String>,
    /// Seconds since the epoch; `watch-store` rescans from the last one it saw.
    pub registration_time: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "{path}: is not a valid path in the Nix store\nhint: build or realise it first (nix-store --realise {path})"
    )]
    NotValid { path: String },
    #[error(
        "{db}: cannot read the Nix store database ({source}), and `nix path-info` failed too: {fallback}\nhint: run narpost as root or as a user allowed to use the Nix daemon"
    )]
    Unreadable {
        db: String,
        source: rusqlite::Error,
        fallback: String,
    },
    #[error("{db}: cannot query the Nix store database: {source}")]
    Query { db: String, source: rusqlite::Error },
    #[error("{db}: path {path} has an unreadable {field} ({value:?}) in the store database")]
    BadRow {
        db: String,
        path: String,
        field: &'static str,
        value: String,
    },
    #[error("nix path-info: {0}")]
    NixCli(String),
}

/// Read access to the local Nix store's metadata. `Send + Sync`; every method blocks, so
/// async callers use `spawn_blocking`.
pub struct Store {
    db: PathBuf,
    /// Unset while the store is asked through `nix` instead, and then tried again every
    /// [`RETRY_DB`]: where Nix has never run there is no database yet, and the daemon may
    /// well start before the first build makes it (build claims see builds only in it).
    conn: OnceLock<Mutex<Connection>>,
    next_try: Mutex<Instant>,
}

/// How often a store on the `nix` fallback tries its database again.
const RETRY_DB: Duration = Duration::from_secs(1);

/// The database Nix itself uses: `$NIX_STATE_DIR/db/db.sqlite`, by default under /nix/var/nix.
pub fn default_db_path() -> PathBuf {
    let state = std::env::var_os("NIX_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/nix/var/nix"));
    state.join("db").join("db.sqlite")
}

impl Store {
    pub fn open_default() -> Result<Store, StoreError> {
        Self::open(&default_db_path())
    }

    pub fn open(db: &Path) -> Result<Store, StoreError> {
        let store = Store {
            db: db.to_path_buf(),
            conn: OnceLock::new(),
            next_try: Mutex::new(Instant::now() + RETRY_DB),
        };
        match open_db(db) {
            Ok(conn) => {
                let _ = store.conn.set(Mutex::new(conn));
                Ok(store)
            }
            // Only fall back when Nix itself can answer; otherwise the database error is the
            // one that says what is wrong.
            Err(source) => match nix_cli_probe() {
                Ok(()) => Ok(store),
                Err(fallback) => Err(StoreError::Unreadable {
                    db: db.display().to_string(),
                    source,
                    fallback,
                }),
            },
        }
    }

    /// The database, if it is open or opens now; `None`: ask `nix`.
    fn conn(&self) -> Option<std::sync::MutexGuard<'_, Connection>> {
        if let Some(conn) = self.conn.get() {
            return Some(lock(conn));
        }
        {
            let mut next = lock(&self.next_try);
            if Instant::now() < *next {
                return None;
            }
            *next = Instant::now() + RETRY_DB;
        }
        let conn = open_db(&self.db).ok()?;
        let _ = self.conn.set(Mutex::new(conn));
        self.conn.get().map(lock)
    }

    /// Whether the store is read from Nix's database (not through `nix`) right now.
    pub fn reads_the_database(&self) -> bool {
        self.conn().is_some()
    }

    /// Info for exactly these paths, in the order given. A path that is not valid is an error.
    pub fn query(&self, paths: &[StorePath]) -> Result<Vec<PathInfo>, StoreError> {
        match self.conn() {
            Some(conn) => {
                let mut q = DbQuery::new(&conn, &self.db)?;
                paths
                    .iter()
                    .map(|p| {
                        q.info(p)?.ok_or_else(|| StoreError::NotValid {
                            path: p.to_absolute(),
                        })
                    })
                    .collect()
            }
            None => {
                let infos = nix_path_info(paths, false)?;
                let by_path: HashMap<_, _> =
                    infos.into_iter().map(|i| (i.path.clone(), i)).collect();
                paths
                    .iter()
                    .map(|p| {
                        by_path.get(p).cloned().ok_or_else(|| StoreError::NotValid {
                            path: p.to_absolute(),
                        })
                    })
                    .collect()
            }
        }
    }

    /// The closure of `roots`, every path exactly once, references before referrers
    /// (ties broken by name so the order is stable).
    pub fn closure(&self, roots: &[StorePath]) -> Result<Vec<PathInfo>, StoreError> {
        let infos = match self.conn() {
            Some(conn) => {
                let mut q = DbQuery::new(&conn, &self.db)?;
                let mut seen: HashSet<StorePath> = HashSet::new();
                let mut todo: VecDeque<StorePath> = roots.iter().cloned().collect();
                let mut out = Vec::new();
                while let Some(p) = todo.pop_front() {
                    if !seen.insert(p.clone()) {
                        continue;
                    }
                    let info = q.info(&p)?.ok_or_else(|| StoreError::NotValid {
                        path: p.to_absolute(),
                    })?;
                    for r in &info.references {
                        if !seen.contains(r) {
                            todo.push_back(r.clone());
                        }
                    }
                    out.push(info);
                }
                out
            }
            None => nix_path_info(roots, true)?,
        };
        Ok(topo_sort(infos))
    }

    pub fn is_valid(&self, path: &StorePath) -> Result<bool, StoreError> {
        match self.conn() {
            Some(conn) => {
                let mut q = DbQuery::new(&conn, &self.db)?;
                Ok(q.id(path)?.is_some())
            }
            None => match nix_path_info(std::slice::from_ref(path), false) {
                Ok(v) => Ok(!v.is_empty()),
                Err(StoreError::NotValid { .. }) => Ok(false),
                Err(e) => Err(e),
            },
        }
    }

    /// The store path whose hash part is `hash`, valid or not: a valid path, or an output
    /// of a derivation in the store (Nix records those before building them). `None` when
    /// the store knows no such path, or can only be asked through `nix` (which knows only
    /// valid paths).
    pub fn path_from_hash_part(&self, hash: &str) -> Result<Option<StorePath>, StoreError> {
        let Some(conn) = self.conn() else {
            return Ok(None);
        };
        let db = &self.db;
        let from = format!("{}/{hash}-", crate::format::store_path::STORE_DIR);
        // `-` is followed by `.` in ASCII: every name starting with the prefix sorts below.
        let to = format!("{}/{hash}.", crate::format::store_path::STORE_DIR);
        let query = |sql: &str| -> Result<Option<String>, rusqlite::Error> {
            let mut stmt = conn.prepare_cached(sql)?;
            let mut rows = stmt.query(rusqlite::params![from, to])?;
            match rows.next()? {
                Some(row) => row.get(0).map(Some),
                None => Ok(None),
            }
        };
        let found = query("SELECT path FROM ValidPaths WHERE path >= ?1 AND path < ?2 LIMIT 1")
            .and_then(|valid| match valid {
                Some(p) => Ok(Some(p)),
                None => query(
                    "SELECT path FROM DerivationOutputs WHERE path >= ?1 AND path < ?2 LIMIT 1",
                ),
            })
            .map_err(|source| StoreError::Query {
                db: db.display().to_string(),
                source,
            })?;
        Ok(found.and_then(|p| StorePath::from_absolute(&p).ok()))
    }

    /// Paths registered at or after `since` (seconds), with their registration time, oldest
    /// first. Used to rescan after the store watcher lost events.
    pub fn registered_since(&self, since: i64) -> Result<Vec<(StorePath, i64)>, StoreError> {
        let Some(conn) = self.conn() else {
            return Err(StoreError::NixCli(
                "scanning by registration time needs read access to the store database; run as root".into(),
            ));
        };
        let db = &self.db;
        let query_err = |source| StoreError::Query {
            db: db.display().to_string(),
            source,
        };
        let mut stmt = conn
            .prepare_cached(
                "SELECT path, registrationTime FROM ValidPaths WHERE registrationTime >= ?1 ORDER BY registrationTime, id",
            )
            .map_err(query_err)?;
        let rows = stmt
            .query_map([since], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            })
            .map_err(query_err)?;
        let mut out = Vec::new();
        for row in rows {
            let (path, t) = row.map_err(query_err)?;
            // A row Nix wrote that we cannot parse is not ours to judge; skip it.
            if let Ok(p) = StorePath::from_absolute(&path) {
                out.push((p, t));
            }
        }
        Ok(out)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves what it guards intact (a connection, an instant).
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn open_db(db: &Path) -> Result<Connection, rusqlite::Error> {
    let uri = format!("file:{}?mode=ro", db.display());
    let conn = Connection::open_with_flags(
        uri,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    // Nix holds write locks briefly while registering paths; wait rather than fail.
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    // Opening is lazy: touch the schema now so a missing or unreadable database fails here.
    conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE name = 'ValidPaths'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .and_then(|n| {
        if n == 1 {
            Ok(())
        } else {
            Err(rusqlite::Error::InvalidQuery)
        }
    })?;
    Ok(conn)
}

struct DbQuery<'c> {
    db: &'c Path,
    by_path: rusqlite::CachedStatement<'c>,
    refs: rusqlite::CachedStatement<'c>,
}

impl<'c> DbQuery<'c> {
    fn new(conn: &'c Connection, db: &'c Path) -> Result<Self, StoreError> {
        let err = |source| StoreError::Query {
            db: db.display().to_string(),
            source,
        };
        Ok(DbQuery {
            db,
            by_path: conn
                .prepare_cached(
                    "SELECT id, hash, registrationTime, deriver, narSize, sigs, ca FROM ValidPaths WHERE path = ?1",
                )
                .map_err(err)?,
            refs: conn
                .prepare_cached(
                    "SELECT p.path FROM Refs r JOIN ValidPaths p ON r.reference = p.id WHERE r.referrer = ?1",
                )
                .map_err(err)?,
        })
    }

    fn query_err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Query {
            db: self.db.display().to_string(),
            source,
        }
    }

    fn bad_row(&self, path: &StorePath, field: &'static str, value: &str) -> StoreError {
        StoreError::BadRow {
            db: self.db.display().to_string(),
            path: path.to_absolute(),
            field,
            value: value.to_string(),
        }
    }

    fn id(&mut self, path: &StorePath) -> Result<Option<i64>, StoreError> {
        let abs = path.to_absolute();
        self.by_path
            .query_row([&abs], |r| r.get::<_, i64>(0))
            .optional()
            .map_err(|e| self.query_err(e))
    }

    fn info(&mut self, path: &StorePath) -> Result<Option<PathInfo>, StoreError> {
        type Row = (
            i64,
            String,
            i64,
            Option<String>,
            Option<i64>,
            Option<String>,
            Option<String>,
        );
        let abs = path.to_absolute();
        let row: Option<Row> = self
            .by_path
            .query_row([&abs], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            })
            .optional()
            .map_err(|e| self.query_err(e))?;
        let Some((id, hash, registration_time, deriver, nar_size, sigs, ca)) = row else {
            return Ok(None);
        };
        let nar_hash = Sha256::parse(&hash).map_err(|_| self.bad_row(path, "hash", &hash))?;
        let nar_size = nar_size
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| self.bad_row(path, "narSize", "NULL"))?;
        // An unparseable deriver only loses an informational field; keep going without it.
        let deriver = deriver
            .filter(|d| !d.is_empty())
            .and_then(|d| StorePath::from_absolute(&d).ok());
        let sigs = sigs
            .unwrap_or_default()
            .split_ascii_whitespace()
            .map(str::to_string)
            .collect();
        let ca = ca.filter(|c| !c.is_empty());
        let mut references = BTreeSet::new();
        let db = self.db;
        let query_err = |source| StoreError::Query {
            db: db.display().to_string(),
            source,
        };
        let ref_rows: Vec<String> = self
            .refs
            .query_map([id], |r| r.get::<_, String>(0))
            .map_err(query_err)?
            .collect::<Result<_, _>>()
            .map_err(query_err)?;
        for r in ref_rows {
            let p =
                StorePath::from_absolute(&r).map_err(|_| self.bad_row(path, "reference", &r))?;
            references.insert(p);
        }
        Ok(Some(PathInfo {
            path: path.clone(),
            nar_hash,
            nar_size,
            references,
            deriver,
            sigs,
            ca,
            registration_time,
        }))
    }
}

/// References before referrers; among paths whose references are all placed, by name.
/// Self-references are ignored, and references outside `infos` are taken as satisfied.
pub fn topo_sort(infos: Vec<PathInfo>) -> Vec<PathInfo> {
    let index: HashMap<StorePath, usize> = infos
        .iter()
        .enumerate()
        .map(|(i, info)| (info.path.clone(), i))
        .collect();
    let mut pending = vec![0usize; infos.len()];
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); infos.len()];
    for (i, info) in infos.iter().enumerate() {
        for r in &info.references {
            if r == &info.path {
                continue;
            }
            if let Some(&j) = index.get(r) {
                pending[i] += 1;
                dependents[j].push(i);
            }
        }
    }
    let mut ready: BTreeSet<(StorePath, usize)> = infos
        .iter()
        .enumerate()
        .filter(|(i, _)| pending[*i] == 0)
        .map(|(i, info)| (info.path.clone(), i))
        .collect();
    let mut order = Vec::with_capacity(infos.len());
    while let Some(first) = ready.pop_first() {
        let i = first.1;
        order.push(i);
        for &d in &dependents[i] {
            pending[d] -= 1;
            if pending[d] == 0 {
                ready.insert((infos[d].path.clone(), d));
            }
        }
    }
    // A reference cycle cannot happen in a valid store; if the database says otherwise,
    // keep the paths anyway (appended) rather than drop them.
    if order.len() < infos.len() {
        let placed: HashSet<usize> = order.iter().copied().collect();
        order.extend((0..infos.len()).filter(|i| !placed.contains(i)));
    }
    let mut slots: Vec<Option<PathInfo>> = infos.into_iter().map(Some).collect();
    order.into_iter().filter_map(|i| slots[i].take()).collect()
}

/// Checks that `nix` can reach the store. `nix store info` is the command since Nix 2.19;
/// older Nix only knows it as `nix store ping` (which 2.19 and later still take, with a
/// deprecation warning), so `ping` is asked only when `info` is not a command.
fn nix_cli_probe() -> Result<(), String> {
    let ask = |sub: &str| {
        Command::new("nix")
            .args(["--extra-experimental-features", "nix-command", "store", sub])
            .output()
            .map_err(|e| format!("cannot run nix: {e}"))
    };
    let mut out = ask("info")?;
    if !out.status.success()
        && String::from_utf8_lossy(&out.stderr).contains("not a recognised command")
    {
        out = ask("ping")?;
    }
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// One path in `nix path-info --json`. Nix before 2.19 prints a list of these with a `path`
/// field (and `"valid": false` for an invalid path); 2.19 and later print an object keyed
/// by store path, without `path`, with `null` for an invalid path.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CliPathInfo {
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    valid: Option<bool>,
    nar_hash: Option<String>,
    nar_size: Option<u64>,
    #[serde(default)]
    references: Vec<String>,
    deriver: Option<String>,
    #[serde(default)]
    signatures: Vec<String>,
    ca: Option<String>,
    registration_time: Option<i64>,
}

fn nix_path_info(paths: &[StorePath], recursive: bool) -> Result<Vec<PathInfo>, StoreError> {
    let mut cmd = Command::new("nix");
    cmd.args([
        "--extra-experimental-features",
        "nix-command",
        "path-info",
        "--json",
    ]);
    if recursive {
        cmd.arg("--recursive");
    }
    cmd.args(paths.iter().map(|p| p.to_absolute()));
    let out = cmd
        .output()
        .map_err(|e| StoreError::NixCli(format!("cannot run nix: {e}")))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if msg.contains("is not valid") {
            return Err(StoreError::NotValid {
                path: paths.first().map(|p| p.to_absolute()).unwrap_or_default(),
            });
        }
        return Err(StoreError::NixCli(msg));
    }
    parse_path_info_json(&out.stdout)
}

/// The paths `nix path-info --json` printed, in either shape (see [`CliPathInfo`]). An
/// invalid path in the output is an error naming it.
fn parse_path_info_json(json: &[u8]) -> Result<Vec<PathInfo>, StoreError> {
    let unexpected = |e: serde_json::Error| StoreError::NixCli(format!("unexpected JSON: {e}"));
    let rows: Vec<(String, Option<CliPathInfo>)> =
        match json.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => serde_json::from_slice::<BTreeMap<String, Option<CliPathInfo>>>(json)
                .map_err(unexpected)?
                .into_iter()
                .collect(),
            _ => serde_json::from_slice::<Vec<CliPathInfo>>(json)
                .map_err(unexpected)?
                .into_iter()
                .map(|mut row| (row.path.take().unwrap_or_default(), Some(row)))
                .collect(),
        };
    let bad = |what: &str, p: &str| StoreError::NixCli(format!("{p}: unexpected {what}"));
    let mut infos = Vec::with_capacity(rows.len());
    for (abs, row) in rows {
        let Some(row) = row.filter(|r| r.valid != Some(false)) else {
            return Err(StoreError::NotValid { path: abs });
        };
        let path = StorePath::from_absolute(&abs).map_err(|_| bad("path", &abs))?;
        let nar_hash = row
            .nar_hash
            .as_deref()
            .and_then(|h| Sha256::parse(h).ok())
            .ok_or_else(|| bad("narHash", &abs))?;
        let mut references = BTreeSet::new();
        for r in &row.references {
            references.insert(StorePath::from_absolute(r).map_err(|_| bad("reference", &abs))?);
        }
        infos.push(PathInfo {
            path,
            nar_hash,
            nar_size: row.nar_size.ok_or_else(|| bad("narSize", &abs))?,
            references,
            deriver: row.deriver.and_then(|d| StorePath::from_absolute(&d).ok()),
            sigs: row.signatures,
            ca: row.ca,
            registration_time: row.registration_time.unwrap_or(0),
        });
    }
    Ok(infos)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(name: &str, refs: &[&str]) -> PathInfo {
        let mk = |n: &str| {
            StorePath::from_base(&format!("{}-{n}", "0".repeat(31) + &n[..1]))
                .expect("valid test path")
        };
        PathInfo {
            path: mk(name),
            nar_hash: Sha256::digest(name.as_bytes()),
            nar_size: 8,
            references: refs.iter().map(|r| mk(r)).collect(),
            deriver: None,
            sigs: vec![],
            ca: None,
            registration_time: 0,
        }
    }

    #[test]
    fn topo_sort_puts_references_first() {
        // c -> b -> a, c -> a, and a self-reference on b.
        let infos = vec![sp("c", &["b", "a"]), sp("b", &["a", "b"]), sp("a", &[])];
        let order: Vec<String> = topo_sort(infos)
            .into_iter()
            .map(|i| i.path.name().to_string())
            .collect();
        assert_eq!(order, ["a", "b", "c"]);
    }

    #[test]
    fn topo_sort_ignores_references_outside_the_set() {
        let infos = vec![sp("b", &["z"]), sp("a", &[])];
        let order: Vec<String> = topo_sort(infos)
            .into_iter()
            .map(|i| i.path.name().to_string())
            .collect();
        assert_eq!(order.len(), 2);
    }

    /// `nix path-info --json` of the same three paths (one signed, one content-addressed,
    /// one referring to another) as each Nix printed it; see tests/fixtures/path-info.
    const NIX_2_8: &[u8] = include_bytes!("../tests/fixtures/path-info/nix-2.8/three.json");
    const NIX_2_26: &[u8] = include_bytes!("../tests/fixtures/path-info/nix-2.26/three.json");
    const NIX_2_8_INVALID: &[u8] =
        include_bytes!("../tests/fixtures/path-info/nix-2.8/with-invalid.json");
    const NIX_2_26_INVALID: &[u8] =
        include_bytes!("../tests/fixtures/path-info/nix-2.26/with-invalid.json");

    fn fixture_path(base: &str) -> StorePath {
        StorePath::from_base(base).expect("a fixture store path")
    }

    #[test]
    fn path_info_json_of_nix_2_8_and_2_26_reads_the_same() {
        let read = |json| {
            let mut infos = parse_path_info_json(json).expect("parse path-info JSON");
            // The two stores registered the paths at different times; all else is equal.
            for info in &mut infos {
                assert!(info.registration_time > 0, "{info:?}");
                info.registration_time = 0;
            }
            infos.sort_by(|a, b| a.path.cmp(&b.path));
            infos
        };
        let old = read(NIX_2_8);
        assert_eq!(old, read(NIX_2_26));

        let a = fixture_path("0a9md1shvh6qsmdjzvvhh409rpk8l5ni-narpost-fixture-a");
        let b = fixture_path("ww5zcv7fpg1w2mn1as2010mmfdr86ad4-narpost-fixture-b");
        let added = fixture_path("6j7nyy0di7y62y76q6z3y7k0r979q54d-narpost-fixture-added");
        let by_path: HashMap<_, _> = old.iter().map(|i| (i.path.clone(), i)).collect();
        assert_eq!(by_path.len(), 3);

        let info_a = by_path[&a];
        assert_eq!(
            info_a.nar_hash,
            Sha256::parse("sha256-knb9U7Sdy/YWj4gjrvFIevLuTiMEt+5kEtunmYK5CoY=").unwrap()
        );
        assert_eq!(info_a.nar_size, 120);
        assert!(info_a.references.is_empty());
        assert_eq!(
            info_a.deriver,
            Some(fixture_path(
                "0asz0cwqjm6j4i8mivmbg7gs92mgq75x-narpost-fixture-a.drv"
            ))
        );
        assert_eq!(info_a.sigs.len(), 1);
        assert!(info_a.sigs[0].starts_with("narpost-fixture-1:SwfvSTKs"));
        assert_eq!(info_a.ca, None);

        let info_b = by_path[&b];
        assert_eq!(info_b.nar_size, 344);
        assert_eq!(info_b.references, BTreeSet::from([a.clone()]));
        assert!(info_b.sigs.is_empty());

        let info_added = by_path[&added];
        assert_eq!(info_added.deriver, None);
        assert_eq!(
            info_added.ca.as_deref(),
            Some("fixed:r:sha256:0hpcnirn9lxbzw7kc18apxl0c7gflk1kbyfbbfc04yc5kscdnvzc")
        );
    }

    #[test]
    fn an_invalid_path_in_either_shape_is_named() {
        for json in [NIX_2_8_INVALID, NIX_2_26_INVALID] {
            match parse_path_info_json(json) {
                Err(StoreError::NotValid { path }) => assert_eq!(
                    path,
                    "/nix/store/00000000000000000000000000000000-narpost-fixture-missing"
                ),
                other => panic!("expected NotValid, got {other:?}"),
            }
        }
    }

    #[test]
    fn path_info_json_of_another_shape_is_a_clear_error() {
        for json in [&b"42"[..], b"\"no\"", b"{\"/nix/store/x\": 1}", b""] {
            let err = parse_path_info_json(json).expect_err("not path-info JSON");
            assert!(
                err.to_string()
                    .starts_with("nix path-info: unexpected JSON"),
                "{err}"
            );
        }
        // A key that is not a store path is named.
        let err = parse_path_info_json(br#"{"/tmp/x": {"narHash": "sha256-knb9U7Sdy/YWj4gjrvFIevLuTiMEt+5kEtunmYK5CoY=", "narSize": 1}}"#)
            .expect_err("not a store path");
        assert_eq!(err.to_string(), "nix path-info: /tmp/x: unexpected path");
    }

    #[test]
    fn a_database_that_nix_makes_after_the_store_opened_is_read_from_then_on() {
        let state = tempfile::tempdir().unwrap();
        let store = Store::open(&state.path().join("db/db.sqlite")).expect("the nix fallback");
        let path = fixture_path("0a9md1shvh6qsmdjzvvhh409rpk8l5ni-narpost-fixture-a");
        let hash = path.hash_part().to_owned();
        assert!(!store.reads_the_database());
        assert_eq!(store.path_from_hash_part(&hash).unwrap(), None);

        let nix_store = |args: &[&str], stdin: &str| {
            use std::io::Write;
            let mut child = Command::new("nix-store")
                .args(args)
                .env("NIX_STATE_DIR", state.path())
                .stdin(std::process::Stdio::piped())
                .spawn()
                .expect("nix-store (scripts/install-deps installs it)");
            child
                .stdin
                .take()
                .unwrap()
                .write_all(stdin.as_bytes())
                .unwrap();
            assert!(child.wait().unwrap().success(), "nix-store {args:?}");
        };
        nix_store(&["--init"], "");
        let registration = format!(
            "{}\nsha256:{}\n120\n\n0\n",
            path.to_absolute(),
            "0".repeat(52)
        );
        nix_store(&["--load-db"], &registration);
        std::thread::sleep(RETRY_DB);
        assert_eq!(store.path_from_hash_part(&hash).unwrap(), Some(path));
        assert!(store.reads_the_database());
    }
}
