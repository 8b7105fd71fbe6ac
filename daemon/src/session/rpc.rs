//! The daemon seam: `tilewised` plugs the manager in as its `TuningService` (see the `ipc` module
//! docs), and session errors become JSON-RPC errors.

use super::manager::{lock, DeviceInfo, ManagerOptions, SessionError, SessionManager};
use super::settings::StartParams;
use super::LlmSource;
use crate::ipc::protocol::{
    codes, RpcError, SessionListResult, SessionShowParams, SessionShowResult, TuningStartParams, TuningStartResult, TuningStatus,
    TuningStopParams, TuningStopResult,
};
use crate::ipc::{BoxFuture, TuningService};
use crate::worker::WorkerConfig;
use std::time::Duration;
use tokio::sync::watch;

impl SessionManager {
    /// A manager wired to a daemon: its store, event bus, probed device and config (Python
    /// interpreter, worker timeouts, LLM endpoint).
    pub fn from_state(state: &crate::ipc::server::DaemonState) -> SessionManager {
        let config = state.config.read().unwrap_or_else(|p| p.into_inner()).clone();
        // A Python that has the package (python.rs); without one, sessions fail to start and say how
        // to name one.
        let (python, python_problem) = match crate::python::find(&config, &state.paths.config_file) {
            Ok(chosen) => {
                tracing::info!(python = %chosen.path.display(), how = %chosen.how, "worker python");
                (chosen.path, None)
            }
            Err(why) => {
                tracing::warn!("{why}");
                (config.python_path(), Some(why))
            }
        };
        let mut worker = WorkerConfig::new(python);
        worker.ready_timeout = Duration::from_secs(config.worker.start_timeout_s.max(1));
        let chip = state.device.chip.clone().unwrap_or_else(|| format!("{} cpu", state.device.arch));
        SessionManager::new(ManagerOptions {
            store: state.store.clone(),
            events: state.events.clone(),
            worker,
            device: DeviceInfo { fingerprint: state.device_fingerprint.clone(), chip },
            llm: LlmSource::Live(state.config.clone()),
            gate: None,
            load_timeout: Duration::from_secs(config.worker.request_timeout_s.max(60)),
            python_problem,
        })
    }

    /// Pauses sessions while the scheduler's gate is closed.
    pub fn with_gate(mut self, gate: watch::Receiver<crate::gate::Decision>) -> SessionManager {
        self.opts.gate = Some(gate);
        self
    }
}

impl From<SessionError> for RpcError {
    fn from(e: SessionError) -> RpcError {
        let code = match &e {
            SessionError::BadParams(_) => codes::INVALID_PARAMS,
            SessionError::InvalidPolicy(_) => codes::INVALID_POLICY,
            SessionError::NotFound(_) => codes::NOT_FOUND,
            SessionError::Busy(..) => codes::BUSY,
            SessionError::Worker(_) | SessionError::WorkerStart(_) | SessionError::Store(_) => codes::INTERNAL,
        };
        RpcError::new(code, e.to_string())
    }
}

impl TuningService for SessionManager {
    fn status(&self) -> TuningStatus {
        let live = self.live.lock().unwrap().clone();
        match self.current() {
            Some(id) => TuningStatus {
                state: if live.paused.is_some() { "paused" } else { "tuning" }.into(),
                reason: live.paused,
                session_id: Some(id),
                detail: Some(live.progress),
            },
            None => TuningStatus { state: "idle".into(), reason: live.last_end, session_id: None, detail: None },
        }
    }

    fn start(&self, params: TuningStartParams) -> BoxFuture<'_, Result<TuningStartResult, RpcError>> {
        Box::pin(async move {
            let value = serde_json::to_value(&params).map_err(|e| RpcError::new(codes::INVALID_PARAMS, e.to_string()))?;
            let p: StartParams =
                serde_json::from_value(value).map_err(|e| RpcError::new(codes::INVALID_PARAMS, format!("tuning.start: {e}")))?;
            let (session_id, resumed) = SessionManager::start(self, p).await?;
            Ok(TuningStartResult { session_id, resumed })
        })
    }

    fn stop(&self, params: TuningStopParams) -> BoxFuture<'_, Result<TuningStopResult, RpcError>> {
        Box::pin(async move { Ok(TuningStopResult { stopped: SessionManager::stop(self, params.session_id).await }) })
    }

    fn list_sessions(&self) -> BoxFuture<'_, Result<SessionListResult, RpcError>> {
        Box::pin(async move {
            let sessions = lock(&self.opts.store).list_sessions(100).map_err(SessionError::from)?;
            Ok(SessionListResult { sessions })
        })
    }

    fn show_session(&self, params: SessionShowParams) -> BoxFuture<'_, Result<SessionShowResult, RpcError>> {
        Box::pin(async move { Ok(self.show_typed(params.session_id)?) })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.shutting_down.store(true, std::sync::atomic::Ordering::SeqCst);
            SessionManager::stop(self, None).await;
        })
    }
}
