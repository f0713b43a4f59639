//! Operations shared by the CLI, the JSON API and the dashboard.
//!
//! Each operation validates its input, checks that the caller's [`Scope`] may see the objects it
//! names (an object of another workspace is reported as not found, never as forbidden, so ids do
//! not leak), writes its rows and its audit entry in one transaction, and returns a view.

pub mod api_keys;
pub mod attempts;
pub mod audit;
pub mod connections;
pub mod invitations;
pub mod keys;
pub mod links;
pub mod logos;
pub mod processes;
pub mod refresh;
pub mod users;
pub mod webhooks;
pub mod workspaces;

use crate::crypto::CryptoError;
use crate::db::DbError;
use crate::domain::FieldError;

/// Who is acting: recorded in the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// An operator at the command line.
    Cli,
    /// A request authenticated by an API key.
    ApiKey {
        /// The key's id.
        id: String,
    },
    /// A signed-in dashboard user.
    User {
        /// The user's id.
        id: String,
    },
    /// A client using a link.
    Client,
    /// authlink itself (background jobs).
    System,
}

impl Actor {
    /// The `actor_kind` column value.
    pub fn kind(&self) -> &'static str {
        match self {
            Actor::Cli => "cli",
            Actor::ApiKey { .. } => "api_key",
            Actor::User { .. } => "user",
            Actor::Client => "client",
            Actor::System => "system",
        }
    }

    /// The `actor_id` column value.
    pub fn id(&self) -> Option<&str> {
        match self {
            Actor::ApiKey { id } | Actor::User { id } => Some(id),
            _ => None,
        }
    }

    /// The `created_by` form: `cli`, `api_key:<id>`, `user:<id>`.
    pub fn label(&self) -> String {
        match self.id() {
            Some(id) => format!("{}:{id}", self.kind()),
            None => self.kind().to_string(),
        }
    }
}

/// What the caller may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every workspace (platform admins, the CLI).
    Admin,
    /// One workspace.
    Workspace(String),
}

impl Scope {
    /// Whether the caller may see objects of `workspace_id`.
    pub fn allows(&self, workspace_id: &str) -> bool {
        match self {
            Scope::Admin => true,
            Scope::Workspace(id) => id == workspace_id,
        }
    }

    /// The workspace a listing is limited to, by id: the caller's own, or for admins the one
    /// asked for (none: every workspace). The one asked for may be named by id or slug, as
    /// everywhere else. Asking for another workspace, or one that does not exist, is "not found".
    pub async fn listing_workspace(
        &self,
        conn: &mut sqlx::AnyConnection,
        requested: Option<&str>,
    ) -> ServiceResult<Option<String>> {
        let Some(requested) = requested else {
            return Ok(self.workspace().map(str::to_string));
        };
        let found = crate::db::workspaces::get_by_id_or_slug(conn, requested).await?;
        match found {
            Some(w) if self.allows(&w.id) => Ok(Some(w.id)),
            _ => Err(ServiceError::NotFound("workspace")),
        }
    }

    /// The workspace a listing is limited to, if any.
    pub fn workspace(&self) -> Option<&str> {
        match self {
            Scope::Admin => None,
            Scope::Workspace(id) => Some(id),
        }
    }
}

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The object does not exist, or the caller may not see it.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The input is invalid; each error names its field.
    #[error("invalid input: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Validation(Vec<FieldError>),
    /// The caller may not do this at all (e.g. a workspace key creating workspaces).
    #[error("forbidden: {0}")]
    Forbidden(&'static str),
    /// The change conflicts with existing data.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The object changed since the version the caller based its change on; nothing was changed.
    #[error("stale: {0}")]
    Stale(String),
    /// An outside party (a provider) is temporarily unavailable; nothing was changed.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Storage failed.
    #[error(transparent)]
    Db(DbError),
    /// A sealed value could not be opened.
    #[error("sealed data could not be opened: {0}")]
    Crypto(#[from] CryptoError),
}

impl From<DbError> for ServiceError {
    fn from(e: DbError) -> Self {
        match e {
            // Nothing stored can match a key the database cannot even hold (a NUL character
            // given in an address or a form): the object looked for does not exist.
            DbError::InvalidText(cause) => {
                tracing::debug!(error = %cause, "a key the database cannot hold");
                ServiceError::NotFound("object")
            }
            e => ServiceError::Db(e),
        }
    }
}

impl From<sqlx::Error> for ServiceError {
    fn from(e: sqlx::Error) -> Self {
        DbError::from(e).into()
    }
}

impl From<FieldError> for ServiceError {
    fn from(e: FieldError) -> Self {
        ServiceError::Validation(vec![e])
    }
}

/// The result type of services.
pub type ServiceResult<T> = Result<T, ServiceError>;

/// Collects field errors: `Ok` when there were none.
#[derive(Debug, Default)]
pub struct Errors(Vec<FieldError>);

impl Errors {
    /// Keeps the value of `r`, or records its error.
    pub fn take<T>(&mut self, r: Result<T, FieldError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.0.push(e);
                None
            }
        }
    }

    /// Records an error.
    pub fn push(&mut self, e: FieldError) {
        self.0.push(e);
    }

    /// Fails with every recorded error, if any.
    /// Whether no error was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn finish(self) -> ServiceResult<()> {
        if self.0.is_empty() { Ok(()) } else { Err(ServiceError::Validation(self.0)) }
    }
}
