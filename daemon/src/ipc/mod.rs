//! The local-socket API between `tilewised` and everything else (CLI, app, Python plugin, tests).
//!
//! - [`protocol`]: THE wire types (JSON-RPC 2.0 lines, method names, params/results, error codes).
//! - [`server`]: the daemon side — [`server::DaemonState`] (store, event bus, probed device, config)
//!   and [`server::Server`] (socket rules, one task per connection, 64 KiB lines, peer UID check).
//! - [`client`]: [`client::Client`], the one client type the CLI, the app and the tests use.
//! - [`instance`]: one daemon per user (lock file) and stale-socket cleanup.
//!
//! # The tuning seam
//!
//! Methods that belong to the tuning part of the product (`tuning.start`, `tuning.stop`,
//! `session.list`, `session.show`) are answered by a [`TuningService`] when one is plugged in, and
//! with error -32004 "not available: ..." when none is (a state built for a test or the fuzzer).
//! The session manager implements the trait (`crate::session`), and `tilewised`'s main plugs it in:
//!
//! ```no_run
//! # async fn serve() -> anyhow::Result<()> {
//! use std::sync::Arc;
//! use tilewise::ipc::server::{DaemonState, Server};
//! use tilewise::session::SessionManager;
//!
//! let mut state = DaemonState::open(tilewise::paths::Paths::from_env()?, Default::default())?;
//! state.tuning = Some(Arc::new(SessionManager::from_state(&state)));
//! Server::bind(Arc::new(state))?.run(std::future::pending()).await;
//! # Ok(())
//! # }
//! ```
//!
//! The service gets what it needs from the state (`state.store`, `state.events`, `state.paths`,
//! `state.config`, `state.device`). The trait is object-safe: async methods return boxed futures.

pub mod client;
pub mod instance;
pub mod protocol;
pub mod server;

use protocol::{
    RpcError, SessionListResult, SessionShowParams, SessionShowResult, TuningStartParams, TuningStartResult, TuningStatus,
    TuningStopParams, TuningStopResult,
};
use std::future::Future;
use std::pin::Pin;

/// A boxed future, so that [`TuningService`] stays object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the daemon delegates to the tuning part of the product. See the module docs.
pub trait TuningService: Send + Sync + 'static {
    /// What tuning is doing now (shown by `status`). Must not block: keep it in memory.
    fn status(&self) -> TuningStatus;
    /// `tuning.start`: start or resume a session.
    fn start(&self, params: TuningStartParams) -> BoxFuture<'_, Result<TuningStartResult, RpcError>>;
    /// `tuning.stop`.
    fn stop(&self, params: TuningStopParams) -> BoxFuture<'_, Result<TuningStopResult, RpcError>>;
    /// `session.list`.
    fn list_sessions(&self) -> BoxFuture<'_, Result<SessionListResult, RpcError>>;
    /// `session.show`.
    fn show_session(&self, params: SessionShowParams) -> BoxFuture<'_, Result<SessionShowResult, RpcError>>;
    /// Called once when the daemon stops (SIGTERM, `daemon.shutdown`): pause sessions, stop workers.
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}
