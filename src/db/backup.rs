//! Backups of a SQLite database, and restoring one.
//!
//! A backup is SQLite's `VACUUM INTO` run on a read-only connection: one read transaction, so
//! the copy is consistent while authlink serves and writes, and compacted, so rows deleted
//! before it (with their freed pages) are not carried into it. It is written to a file created
//! with mode 0600 next to the destination and moved to its name only once it is complete and
//! has passed an integrity check; an existing file is never overwritten.
//!
//! A restore copies a backup into the database through SQLite's backup API, in one step: the
//! destination's pages are replaced in one write transaction through its own pager, so its WAL
//! is handled by SQLite (a backup file copied over a database whose WAL is still there would be
//! corrupted by it). PostgreSQL has its own tools (`pg_dump`, snapshots); nothing here is for it.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

/// What a backup holds, read from the copy itself.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    /// The file.
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// The newest migration applied to it.
    pub schema_version: i64,
    /// The master keys its sealed values may need (see `authlink keys status`).
    pub keys: Vec<KeyNeeded>,
    /// The ids of the keys its sealed values are sealed with, found by reading them.
    pub sealed_with: Vec<String>,
    /// Rows of the main tables, for a quick look.
    pub workspaces: i64,
    /// Links.
    pub links: i64,
    /// Connections.
    pub connections: i64,
}

impl Summary {
    /// "1 workspace, 3 links, 12 connections".
    pub fn contents(&self) -> String {
        let count = |n: i64, one: &str| format!("{n} {one}{}", if n == 1 { "" } else { "s" });
        format!(
            "{}, {}, {}",
            count(self.workspaces, "workspace"),
            count(self.links, "link"),
            count(self.connections, "connection")
        )
    }
}

/// A master key the data was sealed with.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyNeeded {
    /// Its id.
    pub kid: String,
    /// Its key check value (a sealed constant: shows whether a key ring holds this key).
    #[serde(skip)]
    pub check_value: String,
    /// Whether a re-wrap found no value sealed with it any more.
    pub retired: bool,
}

/// Why a backup or a restore did not happen.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The destination of a backup exists.
    #[error("{0} already exists: a backup never overwrites a file; give a new file name")]
    Exists(PathBuf),
    /// The database to back up is not there.
    #[error("no database at {0}")]
    NoDatabase(PathBuf),
    /// The file to restore is missing, unreadable or not an authlink database.
    #[error("{path} is not an authlink backup: {why}")]
    NotABackup {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The folder a backup should go to is not there.
    #[error("no folder {0} to write the backup to")]
    NoFolder(PathBuf),
    /// A restore onto a database another process has open.
    #[error(
        "{0} is in use by another process (an authlink serve or worker?): stop every process using it, \
         then restore"
    )]
    InUse(PathBuf),
    /// A restore from the database onto itself.
    #[error("{0} is the database itself")]
    SameFile(PathBuf),
    /// A path SQLite cannot be given.
    #[error("{0}: the path must be valid UTF-8")]
    Path(PathBuf),
    /// The file system refused.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// SQLite refused (busy past the timeout, disk full, …).
    #[error("SQLite: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

impl BackupError {
    /// Whether the person running the command gave a wrong file (rather than the system failing).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Self::Exists(_)
                | Self::NoDatabase(_)
                | Self::NoFolder(_)
                | Self::InUse(_)
                | Self::NotABackup { .. }
                | Self::SameFile(_)
                | Self::Path(_)
        )
    }
}

/// How long either side waits for another process's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a restore waits for the target to be free before calling it in use.
const IN_USE_TIMEOUT: Duration = Duration::from_millis(500);

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> BackupError + '_ {
    move |source| BackupError::Io { path: path.to_path_buf(), source }
}

/// Writes a consistent copy of the database at `db` to `output`, which must not exist.
pub fn backup(db: &Path, output: &Path) -> Result<Summary, BackupError> {
    if !db.is_file() {
        return Err(BackupError::NoDatabase(db.to_path_buf()));
    }
    if output.symlink_metadata().is_ok() {
        return Err(BackupError::Exists(output.to_path_buf()));
    }
    let name = output.file_name().ok_or_else(|| BackupError::Path(output.to_path_buf()))?;
    let folder = output.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !folder.is_dir() {
        return Err(BackupError::NoFolder(folder.to_path_buf()));
    }
    let partial = output.with_file_name(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        hex::encode(rand::random::<[u8; 8]>())
    ));
    let partial_str = partial.to_str().ok_or_else(|| BackupError::Path(partial.clone()))?.to_owned();
    // Created empty with mode 0600 (the copy holds sealed tokens and hashed credentials);
    // `VACUUM INTO` accepts an empty file and keeps its mode.
    OpenOptions::new().write(true).create_new(true).mode(0o600).open(&partial).map_err(io_error(&partial))?;
    let written = (|| -> Result<Summary, BackupError> {
        let source = Connection::open_with_flags(
            db,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        source.busy_timeout(BUSY_TIMEOUT)?;
        source.execute("VACUUM INTO ?1", [&partial_str])?;
        drop(source);
        let summary = inspect(&partial)?;
        std::fs::File::open(&partial).and_then(|f| f.sync_all()).map_err(io_error(&partial))?;
        // A hard link fails if the name was taken meanwhile; a rename would replace that file.
        std::fs::hard_link(&partial, output).map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => BackupError::Exists(output.to_path_buf()),
            _ => BackupError::Io { path: output.to_path_buf(), source: e },
        })?;
        Ok(summary)
    })();
    let _ = std::fs::remove_file(&partial);
    let mut summary = written?;
    // The new name is durable once its folder is.
    std::fs::File::open(folder).and_then(|f| f.sync_all()).map_err(io_error(folder))?;
    summary.path = output.to_path_buf();
    Ok(summary)
}

/// Reads what a backup holds, after SQLite's integrity check; refuses a file that is not a
/// SQLite database holding authlink's schema.
pub fn inspect(path: &Path) -> Result<Summary, BackupError> {
    let not_backup = |why: String| BackupError::NotABackup { path: path.to_path_buf(), why };
    let bytes = std::fs::metadata(path).map_err(|e| not_backup(e.to_string()))?.len();
    if bytes == 0 {
        return Err(not_backup("the file is empty".into()));
    }
    let conn =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(|e| not_backup(e.to_string()))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let check: String = conn
        .query_row("PRAGMA integrity_check(1)", [], |r| r.get(0))
        .map_err(|e| not_backup(e.to_string()))?;
    if check != "ok" {
        return Err(not_backup(format!("SQLite's integrity check failed: {check}")));
    }
    let has_table = |table: &str| -> rusqlite::Result<bool> {
        conn.query_row("SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?1", [table], |_| Ok(()))
            .optional()
            .map(|found| found.is_some())
    };
    for table in ["_sqlx_migrations", "key_checks", "workspaces", "links", "connections"] {
        if !has_table(table)? {
            return Err(not_backup(format!("it has no `{table}` table")));
        }
    }
    let schema_version: i64 =
        conn.query_row("SELECT COALESCE(MAX(version), 0) FROM _sqlx_migrations WHERE success", [], |r| {
            r.get(0)
        })?;
    // `retired_at` came with a later migration than the table.
    let has_retired: bool = conn
        .query_row("SELECT 1 FROM pragma_table_info('key_checks') WHERE name = 'retired_at'", [], |_| Ok(()))
        .optional()?
        .is_some();
    let retired = if has_retired { "retired_at IS NOT NULL" } else { "0" };
    let mut keys = Vec::new();
    let mut stmt = conn
        .prepare(&format!("SELECT kid, check_value, {retired} FROM key_checks ORDER BY created_at, kid"))?;
    let rows =
        stmt.query_map([], |r| Ok(KeyNeeded { kid: r.get(0)?, check_value: r.get(1)?, retired: r.get(2)? }))?;
    for row in rows {
        keys.push(row?);
    }
    drop(stmt);
    // The keys the sealed values name, in every sealed column this backup's schema has.
    let mut sealed_with: Vec<String> = Vec::new();
    for col in super::sealed::SEALED_COLUMNS {
        let present: bool = conn
            .query_row("SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2", [col.table, col.column], |_| {
                Ok(())
            })
            .optional()?
            .is_some();
        if !present {
            continue;
        }
        let sql = format!(
            "SELECT DISTINCT {kid} FROM {t} WHERE {envelope}",
            kid = super::sealed::kid_expr(col.column),
            envelope = super::sealed::is_envelope(col.column),
            t = col.table,
        );
        let mut stmt = conn.prepare(&sql)?;
        for kid in stmt.query_map([], |r| r.get::<_, String>(0))? {
            let kid = kid?;
            if !sealed_with.contains(&kid) {
                sealed_with.push(kid);
            }
        }
    }
    sealed_with.sort();
    let count = |table: &str| -> rusqlite::Result<i64> {
        conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
    };
    Ok(Summary {
        sealed_with,
        path: path.to_path_buf(),
        bytes,
        schema_version,
        workspaces: count("workspaces")?,
        links: count("links")?,
        connections: count("connections")?,
        keys,
    })
}

/// Replaces the contents of the database at `db` (created when missing) with the backup at
/// `from`, in one write transaction. The caller has inspected the backup and checked its keys
/// and schema version. Refused while another process has the database open: the target is
/// opened in SQLite's exclusive locking mode, whose lock, once taken, is held until the restore
/// is done, and which no connection of another process lets it take (in WAL mode each holds a
/// shared lock on the file for as long as it is open).
pub fn restore(from: &Path, db: &Path) -> Result<(), BackupError> {
    if let (Ok(a), Ok(b)) = (from.canonicalize(), db.canonicalize())
        && a == b
    {
        return Err(BackupError::SameFile(from.to_path_buf()));
    }
    // A new database is readable by its owner only, as `serve` makes it.
    super::create_private_sqlite_file(db).map_err(io_error(db))?;
    let source = Connection::open_with_flags(
        from,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    let mut target = Connection::open(db)?;
    target.busy_timeout(IN_USE_TIMEOUT)?;
    target.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
    if let Err(e) = target.execute_batch("BEGIN EXCLUSIVE; ROLLBACK;") {
        return Err(match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                BackupError::InUse(db.to_path_buf())
            }
            _ => e.into(),
        });
    }
    let backup = rusqlite::backup::Backup::new(&source, &mut target)?;
    // Every page in one step: the target changes in one transaction, or not at all.
    match backup.step(-1)? {
        rusqlite::backup::StepResult::Done => Ok(()),
        _ => Err(BackupError::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            Some("the database stayed locked by another process; stop authlink and try again".into()),
        ))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A database with the tables `inspect` reads, `key_checks` as the first migration made it
    /// (before `retired_at`).
    fn old_database(path: &Path) {
        let conn = Connection::open(path).unwrap();
        conn.execute_batch(
            "CREATE TABLE _sqlx_migrations (version BIGINT PRIMARY KEY, success BOOLEAN NOT NULL);
             INSERT INTO _sqlx_migrations VALUES (1, 1), (2, 1), (3, 0);
             CREATE TABLE key_checks (kid TEXT PRIMARY KEY, check_value TEXT NOT NULL, created_at INTEGER NOT NULL);
             INSERT INTO key_checks VALUES ('k1', 'v1:k1:sealed', 5);
             CREATE TABLE workspaces (id TEXT PRIMARY KEY);
             INSERT INTO workspaces VALUES ('w1'), ('w2');
             CREATE TABLE links (id TEXT PRIMARY KEY);
             CREATE TABLE connections (id TEXT PRIMARY KEY);",
        )
        .unwrap();
    }

    /// A folder with such a database (`live.db`) and its backup (`copy.db`).
    fn backed_up() -> (tempfile::TempDir, PathBuf, PathBuf, Summary) {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("live.db");
        old_database(&db);
        let copy = dir.path().join("copy.db");
        let summary = backup(&db, &copy).unwrap();
        (dir, db, copy, summary)
    }

    #[test]
    fn backs_up_an_older_schema_and_refuses_what_is_not_one() {
        let (dir, db, copy, summary) = backed_up();
        // The newest successful migration; a key without `retired_at` is still needed.
        assert_eq!((summary.schema_version, summary.workspaces, summary.links), (2, 2, 0));
        assert_eq!(summary.contents(), "2 workspaces, 0 links, 0 connections");
        assert_eq!(summary.keys.len(), 1);
        assert_eq!((summary.keys[0].kid.as_str(), summary.keys[0].retired), ("k1", false));
        assert!(matches!(backup(&db, &copy), Err(BackupError::Exists(_))));
        assert!(matches!(
            backup(&dir.path().join("none.db"), &dir.path().join("x.db")),
            Err(BackupError::NoDatabase(_))
        ));
        let nowhere = backup(&db, &dir.path().join("missing/copy.db")).unwrap_err();
        assert!(matches!(nowhere, BackupError::NoFolder(_)) && nowhere.is_usage(), "{nowhere}");

        // A SQLite database without authlink's tables, and a file that is not SQLite.
        let other = dir.path().join("other.db");
        Connection::open(&other).unwrap().execute_batch("CREATE TABLE t (x)").unwrap();
        let err = inspect(&other).unwrap_err();
        assert!(err.to_string().contains("no `_sqlx_migrations` table"), "{err}");
        std::fs::write(dir.path().join("text.db"), "hello".repeat(1000)).unwrap();
        assert!(matches!(inspect(&dir.path().join("text.db")), Err(BackupError::NotABackup { .. })));
        assert!(err.is_usage());
    }

    #[test]
    fn restores_over_a_database_with_a_wal_and_never_under_a_running_process() {
        let (dir, db, copy, _) = backed_up();
        // The live database moves on, in WAL mode, its last commits in the WAL only.
        let live = Connection::open(&db).unwrap();
        live.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0; \
             INSERT INTO workspaces VALUES ('w3'); INSERT INTO links VALUES ('l1');",
        )
        .unwrap();
        // While a process has it open, a restore is refused and changes nothing.
        let err = restore(&copy, &db).unwrap_err();
        assert!(matches!(err, BackupError::InUse(_)) && err.is_usage(), "{err}");
        assert_eq!(live.query_row("SELECT COUNT(*) FROM links", [], |r| r.get::<_, i64>(0)).unwrap(), 1);
        // What a process that died leaves: the file and a WAL holding commits the file lacks.
        let crashed = dir.path().join("crashed.db");
        std::fs::copy(&db, &crashed).unwrap();
        std::fs::copy(dir.path().join("live.db-wal"), dir.path().join("crashed.db-wal")).unwrap();
        drop(live);
        assert_eq!(inspect(&crashed).unwrap().links, 1, "the copied WAL holds the last commits");
        restore(&copy, &crashed).unwrap();
        let after = inspect(&crashed).unwrap();
        assert_eq!((after.workspaces, after.links), (2, 0));
        // Opened as authlink opens it: nothing of the old WAL comes back.
        let reopened = Connection::open(&crashed).unwrap();
        let links: i64 = reopened.query_row("SELECT COUNT(*) FROM links", [], |r| r.get(0)).unwrap();
        assert_eq!(links, 0);
        drop(reopened);
        // And now that nothing holds it, over the live one.
        restore(&copy, &db).unwrap();
        assert_eq!(inspect(&db).unwrap().workspaces, 2);
        assert!(matches!(restore(&db, &db), Err(BackupError::SameFile(_))));
    }
}
