//! The programs' own log lines (aya-log) for rare kernel events: a rule table without an entry
//! the classifier needed, a walk that hit its step limit, a clone or a copy that failed. Each
//! event is counted whatever the level; the line says which interface, hook, session or rule.
//!
//! The level is fixed when a generation's programs are loaded (`AYA_LOG_LEVEL`, a read-only
//! global): at `off`, the default, the verifier sees every log call as dead code and removes it,
//! so logging costs nothing per packet until `--kernel-log` asks for it.
use aya::Ebpf;
use aya_log::EbpfLogger;

use super::DatapathError;
use crate::task::AbortOnDrop;

/// The programs' log level, set at load (aya-log-ebpf's read-only global).
pub const KERNEL_LOG_GLOBAL: &str = "AYA_LOG_LEVEL";

/// The most severe kernel log lines the agent asks for (`--kernel-log`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelLog {
    #[default]
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl KernelLog {
    /// The value of the programs' `AYA_LOG_LEVEL` global: a line is written when its level
    /// (error 1 … trace 5) is at most this.
    pub fn global(self) -> u8 {
        self as u8
    }
}

/// Starts reading the log lines of `ebpf`'s programs (loaded with a level other than off) into
/// the agent's log, until the returned task is dropped.
pub fn start_reader(ebpf: &mut Ebpf) -> Result<AbortOnDrop, DatapathError> {
    let logger = EbpfLogger::init_with_logger(ebpf, Forward)
        .map_err(|e| DatapathError::KernelLog(e.into()))?;
    let mut lines = crate::sys::readable(logger).map_err(|e| DatapathError::KernelLog(e.into()))?;
    Ok(AbortOnDrop(tokio::spawn(async move {
        while let Ok(mut ready) = lines.readable_mut().await {
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    })))
}

/// Hands aya-log's records to `tracing`, under the target `kernel`.
struct Forward;

impl log::Log for Forward {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "kernel", "{message}"),
            log::Level::Warn => tracing::warn!(target: "kernel", "{message}"),
            log::Level::Info => tracing::info!(target: "kernel", "{message}"),
            log::Level::Debug => tracing::debug!(target: "kernel", "{message}"),
            log::Level::Trace => tracing::trace!(target: "kernel", "{message}"),
        }
    }

    fn flush(&self) {}
}
