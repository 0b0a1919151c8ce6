//! Health-check runners of the client agent, with Consul's check semantics.
//!
//! A [`CheckDefinition`] is what Consul's agent API (`/v1/agent/check/register`, the `Check` and
//! `Checks` of a service registration) and its config files accept. [`CheckDefinition::kind`]
//! validates it into exactly one [`CheckKind`]; [`CheckRunner::spawn`] then runs that kind on a
//! tokio task and reports every change of status or output as a [`CheckUpdate`] on an mpsc
//! channel, until the returned [`CheckHandle`] is stopped or dropped, or the agent's shutdown
//! token fires.
//!
//! * Interval kinds (HTTP, TCP, UDP, gRPC, H2PING, script) probe after a small random stagger and
//!   then every `Interval`; each result goes through Consul's `SuccessBeforePassing`,
//!   `FailuresBeforeWarning` and `FailuresBeforeCritical` thresholds (the first result counts at
//!   once, later flips need that many consecutive results).
//! * TTL checks wait for [`CheckHandle::ttl_update`]; if none comes within the TTL they turn
//!   critical with "TTL expired (last output before timeout follows): ...".
//! * Alias checks mirror the worst status of another node or service, read through the agent's
//!   [`AliasSource`].
//!
//! Definitions and their validation live in the sibling file `check_definition.rs`, the probes
//! in `check_kinds.rs` (tested against real servers in `check_kinds_tests.rs`).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[path = "check_definition.rs"]
mod check_definition;
#[path = "check_kinds.rs"]
mod check_kinds;

use check_definition::split_host_port;
pub use check_definition::{CheckDefinition, CheckError, CheckKind, TlsSettings, format_go_duration, parse_go_duration};

/// Shortest interval a check may run at (Consul's `checks.MinInterval`): anything faster risks
/// fork-bombing the host with script checks and hammering the probed service. Shorter intervals
/// are raised to this, with a warning, as Consul does.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Output kept per check when neither the agent nor the check says otherwise (Consul's
/// `DefaultBufSize`, 4 KiB): outputs travel in every catalog sync, so they must stay small.
pub const DEFAULT_OUTPUT_MAX_SIZE: usize = 4 * 1024;

/// Timeout of one HTTP, TCP, UDP, gRPC or H2PING probe when `Timeout` is unset (Consul's 10 s):
/// generous for a health endpoint, yet short enough that a hung service is noticed.
pub const DEFAULT_NETWORK_TIMEOUT: Duration = Duration::from_secs(10);

/// Timeout of one script run when `Timeout` is unset (Consul's 30 s): scripts do more work than a
/// single request, so they get longer before being killed.
pub const DEFAULT_SCRIPT_TIMEOUT: Duration = Duration::from_secs(30);

/// Upper bound of the random delay before a check's first probe. Consul staggers over the whole
/// interval; bounding it spreads checks registered together (agent start, a service with many
/// checks) while a service with a long interval still gets its first real status promptly.
pub const MAX_INITIAL_STAGGER: Duration = Duration::from_secs(3);

/// Alias checks re-read the aliased health at least this often even without a change
/// notification (Consul's `maxDurationBetweenUpdates`), so a missed notification heals itself.
pub const ALIAS_REFRESH_INTERVAL: Duration = Duration::from_secs(60);

/// Health of a check, ordered from best to worst so that `max` gives the worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Passing,
    Warning,
    Critical,
}

impl Status {
    /// Consul's spelling: "passing", "warning" or "critical".
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Passing => "passing",
            Status::Warning => "warning",
            Status::Critical => "critical",
        }
    }

    /// Parse Consul's spelling (case-insensitively).
    pub fn parse(s: &str) -> Option<Status> {
        match s.trim().to_ascii_lowercase().as_str() {
            "passing" => Some(Status::Passing),
            "warning" => Some(Status::Warning),
            "critical" => Some(Status::Critical),
            _ => None,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One change of a check's status or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckUpdate {
    pub check_id: String,
    pub status: Status,
    pub output: String,
}

/// One check as seen by an [`AliasSource`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AliasedCheck {
    /// Node the check is registered on.
    pub node: String,
    pub check_id: String,
    pub name: String,
    /// Service the check belongs to; empty for node-level checks.
    pub service_id: String,
    pub status: Status,
    pub output: String,
}

/// How alias checks read the health they mirror; provided by the agent.
///
/// For `node == None` (the alias targets this agent's own node) the agent answers from its local
/// state; for another node it answers from whatever it keeps of the catalog (for instance a
/// blocking query it runs), bumping [`AliasSource::subscribe`] when that changes.
pub trait AliasSource: Send + Sync {
    /// Every check registered on `node` (`None`: this agent's node), node-level and service
    /// checks alike. An `Err` turns the alias critical with
    /// "Failure checking aliased node or service: <err>".
    fn checks(&self, node: Option<&str>) -> Result<Vec<AliasedCheck>, String>;

    /// Whether service `service_id` is registered on `node`; asked only when none of the node's
    /// checks belongs to the service.
    fn service_exists(&self, node: Option<&str>, service_id: &str) -> bool;

    /// A receiver whose value changes whenever what `checks` or `service_exists` would answer
    /// may have changed (the value itself is not interpreted).
    fn subscribe(&self) -> watch::Receiver<u64>;
}

/// Agent-provided TLS material for checks (Consul's `enable_agent_tls_for_checks`).
#[derive(Clone, Default)]
pub struct CheckTls {
    /// Trust exactly these roots instead of the system's.
    pub roots: Option<Arc<rustls::RootCertStore>>,
    /// Client certificate presented to servers that ask for one.
    pub client_cert: Option<Arc<rustls::sign::CertifiedKey>>,
}

impl fmt::Debug for CheckTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckTls").field("roots", &self.roots.as_ref().map(|r| r.len())).field("client_cert", &self.client_cert.is_some()).finish()
    }
}

/// Agent-wide settings every runner needs.
#[derive(Clone)]
pub struct RunnerOptions {
    /// Whether script checks may run (`enable_script_checks`; for one check, the agent also
    /// sets it when `enable_local_script_checks` trusts where the check came from).
    pub enable_script_checks: bool,
    /// `enable_local_script_checks`: script checks from config files and the loopback API run.
    pub enable_local_script_checks: bool,
    /// Needed by alias checks.
    pub alias_source: Option<Arc<dyn AliasSource>>,
    /// The agent's `check_output_max_size`; [`DEFAULT_OUTPUT_MAX_SIZE`] when 0.
    pub output_max_size: usize,
    /// Intervals below this are raised to it ([`MIN_INTERVAL`] by default; tests lower it).
    pub min_interval: Duration,
    /// Bound of the random delay before the first probe ([`MAX_INITIAL_STAGGER`] by default).
    pub max_initial_stagger: Duration,
    /// TLS material for HTTPS, TCP+TLS, gRPC-over-TLS and H2PING-over-TLS checks.
    pub tls: CheckTls,
}

impl Default for RunnerOptions {
    fn default() -> Self {
        RunnerOptions {
            enable_script_checks: false,
            enable_local_script_checks: false,
            alias_source: None,
            output_max_size: DEFAULT_OUTPUT_MAX_SIZE,
            min_interval: MIN_INTERVAL,
            max_initial_stagger: MAX_INITIAL_STAGGER,
            tls: CheckTls::default(),
        }
    }
}

impl fmt::Debug for RunnerOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunnerOptions")
            .field("enable_script_checks", &self.enable_script_checks)
            .field("enable_local_script_checks", &self.enable_local_script_checks)
            .field("alias_source", &self.alias_source.is_some())
            .field("output_max_size", &self.output_max_size)
            .field("min_interval", &self.min_interval)
            .field("max_initial_stagger", &self.max_initial_stagger)
            .field("tls", &self.tls)
            .finish()
    }
}

/// Starts check runners.
pub struct CheckRunner;

impl CheckRunner {
    /// Start running `kind` (from `def.kind()`) for check `check_id` on a new tokio task; must be
    /// called inside a tokio runtime.
    ///
    /// The check starts at `def.status` (critical when unset) with empty output; every later
    /// change of status or output is sent on `updates`. The runner stops when the handle is
    /// stopped or dropped, when `shutdown` is cancelled, or when `updates` is closed.
    ///
    /// Fails for script checks when `opts.enable_script_checks` is off and for alias checks
    /// without `opts.alias_source`.
    pub fn spawn(
        check_id: String,
        def: CheckDefinition,
        kind: CheckKind,
        opts: RunnerOptions,
        updates: mpsc::Sender<CheckUpdate>,
        shutdown: CancellationToken,
    ) -> Result<CheckHandle, CheckError> {
        let stop = shutdown.child_token();
        let output_max = def.effective_output_max_size(opts.output_max_size);
        let emitter = Emitter {
            check_id: check_id.clone(),
            updates,
            stop: stop.clone(),
            status: def.status.unwrap_or(Status::Critical),
            output: String::new(),
        };
        let type_name = kind.type_name();
        let (task, ttl) = match kind {
            CheckKind::Ttl { ttl } => {
                let (tx, rx) = watch::channel(None);
                let task = tokio::spawn(run_ttl(ttl, rx, emitter));
                (task, Some(TtlControl { tx, output_max }))
            }
            CheckKind::Alias { node, service } => {
                let source = opts.alias_source.clone().ok_or(CheckError::NoAliasSource)?;
                let task = tokio::spawn(run_alias(node, service, source, emitter));
                (task, None)
            }
            CheckKind::Script { .. } if !opts.enable_script_checks => {
                return Err(CheckError::ScriptsDisabled);
            }
            kind => {
                let requested = kind.interval().unwrap_or(opts.min_interval);
                let interval = if requested < opts.min_interval {
                    tracing::warn!(
                        check = %check_id,
                        interval = ?requested,
                        minimum = ?opts.min_interval,
                        "check interval below minimum; using the minimum"
                    );
                    opts.min_interval
                } else {
                    requested
                };
                let stagger = random_stagger(interval.min(opts.max_initial_stagger));
                let thresholds = Thresholds::new(&def);
                let tls = opts.tls.clone();
                let task = tokio::spawn(async move {
                    // Building a prober may read the system's CA certificates: keep that off
                    // the runtime's worker threads.
                    let built = tokio::task::spawn_blocking(move || check_kinds::Prober::new(&kind, &tls, output_max)).await;
                    match built {
                        Ok(prober) => {
                            run_interval(prober, interval, stagger, thresholds, emitter).await;
                        }
                        Err(e) => tracing::error!(error = %e, "building a check prober failed"),
                    }
                });
                (task, None)
            }
        };
        Ok(CheckHandle { check_id, type_name, stop, ttl, task: Some(task) })
    }
}

struct TtlControl {
    tx: watch::Sender<Option<(Status, String)>>,
    output_max: usize,
}

/// Control of one running check. Dropping the handle stops the check.
pub struct CheckHandle {
    check_id: String,
    type_name: &'static str,
    stop: CancellationToken,
    ttl: Option<TtlControl>,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for CheckHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckHandle")
            .field("check_id", &self.check_id)
            .field("type", &self.type_name)
            .field("stopped", &self.stop.is_cancelled())
            .finish()
    }
}

impl CheckHandle {
    pub fn check_id(&self) -> &str {
        &self.check_id
    }

    /// Consul's name of the check's kind ("http", "ttl", ...).
    pub fn type_name(&self) -> &'static str {
        self.type_name
    }

    pub fn is_ttl(&self) -> bool {
        self.ttl.is_some()
    }

    /// Ask the runner to stop; no update is sent once it has seen the request.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Stop the runner and wait until its task has ended, so that no update can follow (what
    /// Consul does before replacing a check).
    pub async fn stop_and_wait(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Whether the runner's task has ended.
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Set a TTL check's status and output and restart its TTL (`/v1/agent/check/pass` and
    /// friends). Returns the output as stored: cut to the output cap with
    /// " ... (captured N of M bytes)" appended when longer. The runner sends the matching
    /// [`CheckUpdate`] (when it changes anything); the agent may also apply the returned output
    /// itself, e.g. to persist it.
    pub fn ttl_update(&self, status: Status, output: &str) -> Result<String, CheckError> {
        let Some(ttl) = &self.ttl else {
            return Err(CheckError::NotTtl(self.check_id.clone()));
        };
        let output = truncate_ttl_output(output, ttl.output_max);
        ttl.tx.send(Some((status, output.clone()))).map_err(|_| CheckError::Stopped(self.check_id.clone()))?;
        Ok(output)
    }
}

impl Drop for CheckHandle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Consul's TTL output rule: keep the first `max` bytes and say how much there was.
fn truncate_ttl_output(output: &str, max: usize) -> String {
    if output.len() <= max {
        return output.to_string();
    }
    let mut cut = max;
    while !output.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{} ... (captured {max} of {} bytes)", &output[..cut], output.len())
}

fn random_stagger(max: Duration) -> Duration {
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 { Duration::ZERO } else { Duration::from_nanos(rand::random_range(0..=nanos)) }
}

/// Sends updates, skipping those that change nothing.
struct Emitter {
    check_id: String,
    updates: mpsc::Sender<CheckUpdate>,
    stop: CancellationToken,
    status: Status,
    output: String,
}

impl Emitter {
    /// Report `status`/`output`; false when the runner should end (stopped, or nobody listens).
    async fn emit(&mut self, status: Status, output: String) -> bool {
        if self.stop.is_cancelled() {
            return false;
        }
        if status == self.status && output == self.output {
            return true;
        }
        self.status = status;
        self.output = output.clone();
        let update = CheckUpdate { check_id: self.check_id.clone(), status, output };
        tokio::select! {
            biased;
            _ = self.stop.cancelled() => false,
            sent = self.updates.send(update) => sent.is_ok(),
        }
    }
}

/// Consul's `StatusHandler`: the counters start at their thresholds so the first result is
/// reported at once; afterwards a flip to passing needs `SuccessBeforePassing` consecutive
/// successes (warnings count as successes), and failures report warning after
/// `FailuresBeforeWarning` and critical after `FailuresBeforeCritical` consecutive failures.
#[derive(Debug, Clone)]
struct Thresholds {
    success_before_passing: u32,
    failures_before_warning: u32,
    failures_before_critical: u32,
    successes: u32,
    failures: u32,
}

impl Thresholds {
    fn new(def: &CheckDefinition) -> Self {
        let failures_before_warning = if def.failures_before_warning == 0 { def.failures_before_critical } else { def.failures_before_warning };
        Thresholds {
            success_before_passing: def.success_before_passing,
            failures_before_warning,
            failures_before_critical: def.failures_before_critical,
            successes: def.success_before_passing,
            failures: def.failures_before_critical,
        }
    }

    /// The status to report for one probe result, if any.
    fn apply(&mut self, status: Status) -> Option<Status> {
        match status {
            Status::Passing | Status::Warning => {
                self.successes = self.successes.saturating_add(1);
                self.failures = 0;
                (self.successes >= self.success_before_passing).then_some(status)
            }
            Status::Critical => {
                self.failures = self.failures.saturating_add(1);
                self.successes = 0;
                if self.failures >= self.failures_before_critical {
                    Some(Status::Critical)
                } else if self.failures >= self.failures_before_warning {
                    Some(Status::Warning)
                } else {
                    None
                }
            }
        }
    }
}

async fn run_interval(prober: check_kinds::Prober, interval: Duration, stagger: Duration, mut thresholds: Thresholds, mut emitter: Emitter) {
    let stop = emitter.stop.clone();
    tokio::select! {
        _ = stop.cancelled() => return,
        _ = tokio::time::sleep(stagger) => {}
    }
    loop {
        let (status, output) = tokio::select! {
            _ = stop.cancelled() => return,
            result = prober.probe() => result,
        };
        match thresholds.apply(status) {
            Some(reported) => {
                if !emitter.emit(reported, output).await {
                    return;
                }
            }
            None => tracing::debug!(
                check = %emitter.check_id,
                %status,
                "check result below its threshold; not reported yet"
            ),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

async fn run_ttl(ttl: Duration, mut rx: watch::Receiver<Option<(Status, String)>>, mut emitter: Emitter) {
    let stop = emitter.stop.clone();
    let expiry = tokio::time::sleep(ttl);
    tokio::pin!(expiry);
    let mut armed = true;
    let mut last_output = String::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = &mut expiry, if armed => {
                armed = false;
                tracing::warn!(check = %emitter.check_id, "check missed TTL, is now critical");
                let output = if last_output.is_empty() {
                    "TTL expired".to_string()
                } else {
                    format!("TTL expired (last output before timeout follows): {last_output}")
                };
                if !emitter.emit(Status::Critical, output).await {
                    return;
                }
            }
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
                let Some((status, output)) = rx.borrow_and_update().clone() else {
                    continue;
                };
                expiry.as_mut().reset(Instant::now() + ttl);
                armed = true;
                last_output.clone_from(&output);
                if !emitter.emit(status, output).await {
                    return;
                }
            }
        }
    }
}

async fn run_alias(node: Option<String>, service: Option<String>, source: Arc<dyn AliasSource>, mut emitter: Emitter) {
    let stop = emitter.stop.clone();
    let mut changes = source.subscribe();
    let mut notifications = true;
    loop {
        // Mark the current version seen before reading, so a change made while reading wakes
        // the next round instead of being lost.
        changes.borrow_and_update();
        let (status, output) = alias_health(source.as_ref(), node.as_deref(), service.as_deref());
        if !emitter.emit(status, output).await {
            return;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = changes.changed(), if notifications => {
                if changed.is_err() {
                    // The source dropped its sender: fall back to periodic refreshes.
                    notifications = false;
                }
            }
            _ = tokio::time::sleep(ALIAS_REFRESH_INTERVAL) => {}
        }
    }
}

/// Consul's alias rule: the worst status among the aliased service's checks and its node's
/// node-level checks (or only the node-level checks when no service is named).
fn alias_health(source: &dyn AliasSource, node: Option<&str>, service: Option<&str>) -> (Status, String) {
    let mut checks = match source.checks(node) {
        Ok(checks) => checks,
        Err(e) => {
            return (Status::Critical, format!("Failure checking aliased node or service: {e}"));
        }
    };
    checks.sort_by(|a, b| a.check_id.cmp(&b.check_id));
    let target = service.unwrap_or("");
    let mut worst: Option<&AliasedCheck> = None;
    let mut any = false;
    let mut service_found = false;
    for check in &checks {
        if node.is_some_and(|n| !n.eq_ignore_ascii_case(&check.node)) {
            continue;
        }
        if !check.service_id.is_empty() && check.service_id != target {
            continue;
        }
        any = true;
        if !target.is_empty() && check.service_id == target {
            service_found = true;
        }
        if check.status != Status::Passing && worst.is_none_or(|w| check.status > w.status) {
            worst = Some(check);
        }
    }
    if let Some(service) = service
        && !service_found
        && !source.service_exists(node, service)
    {
        let where_ = node.map_or("the local node".to_string(), |n| format!("node {n}"));
        return (Status::Critical, format!("Service {service} could not be found on {where_}"));
    }
    match worst {
        Some(check) => (check.status, format!("Aliased check {:?} failing: {}", check.name, check.output)),
        None if any => (Status::Passing, "All checks passing.".to_string()),
        None => (Status::Passing, "No checks found.".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use parking_lot::Mutex;

    use super::*;

    fn def(json: &str) -> CheckDefinition {
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{json}: {e}"))
    }

    async fn next_update(rx: &mut mpsc::Receiver<CheckUpdate>) -> CheckUpdate {
        tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.expect("no check update in time").expect("runner closed the channel")
    }

    #[test]
    fn thresholds_report_the_first_result_at_once_then_need_consecutive_results() {
        let mut t = Thresholds::new(&def(r#"{"SuccessBeforePassing": 2, "FailuresBeforeCritical": 3}"#));
        assert_eq!(t.apply(Status::Passing), Some(Status::Passing));
        assert_eq!(t.apply(Status::Critical), None);
        assert_eq!(t.apply(Status::Critical), None);
        assert_eq!(t.apply(Status::Critical), Some(Status::Critical));
        assert_eq!(t.apply(Status::Passing), None);
        assert_eq!(t.apply(Status::Critical), None);
        assert_eq!(t.apply(Status::Passing), None);
        assert_eq!(t.apply(Status::Warning), Some(Status::Warning));
        assert_eq!(t.apply(Status::Passing), Some(Status::Passing));

        let mut first_failure = Thresholds::new(&def(r#"{"FailuresBeforeCritical": 3}"#));
        assert_eq!(first_failure.apply(Status::Critical), Some(Status::Critical));
    }

    #[test]
    fn failures_before_warning_reports_warning_before_critical() {
        let mut t = Thresholds::new(&def(r#"{"FailuresBeforeWarning": 1, "FailuresBeforeCritical": 3}"#));
        assert_eq!(t.apply(Status::Passing), Some(Status::Passing));
        assert_eq!(t.apply(Status::Critical), Some(Status::Warning));
        assert_eq!(t.apply(Status::Critical), Some(Status::Warning));
        assert_eq!(t.apply(Status::Critical), Some(Status::Critical));
        let mut none = Thresholds::new(&CheckDefinition::default());
        assert_eq!(none.apply(Status::Critical), Some(Status::Critical));
        assert_eq!(none.apply(Status::Passing), Some(Status::Passing));
    }

    fn spawn(json: &str, opts: RunnerOptions) -> (Result<CheckHandle, CheckError>, mpsc::Receiver<CheckUpdate>) {
        let d = def(json);
        let kind = d.kind().unwrap();
        let (tx, rx) = mpsc::channel(16);
        let handle = CheckRunner::spawn("check".into(), d, kind, opts, tx, CancellationToken::new());
        (handle, rx)
    }

    #[tokio::test]
    async fn script_checks_are_refused_when_scripts_are_disabled() {
        let (handle, _rx) = spawn(r#"{"Args": ["true"], "Interval": "10s"}"#, RunnerOptions::default());
        let err = handle.unwrap_err();
        assert_eq!(err, CheckError::ScriptsDisabled);
        assert_eq!(
            err.to_string(),
            "Scripts are disabled on this agent; to enable, configure 'enable_script_checks' or 'enable_local_script_checks' to true"
        );
    }

    #[tokio::test]
    async fn alias_checks_need_an_alias_source() {
        let (handle, _rx) = spawn(r#"{"AliasService": "web"}"#, RunnerOptions::default());
        assert_eq!(handle.unwrap_err(), CheckError::NoAliasSource);
    }

    #[tokio::test]
    async fn ttl_check_expires_to_critical_with_the_last_output() {
        let (handle, mut rx) = spawn(r#"{"TTL": "300ms", "Status": "passing"}"#, RunnerOptions::default());
        let handle = handle.unwrap();
        assert!(handle.is_ttl());
        let start = Instant::now();
        let expired = next_update(&mut rx).await;
        assert_eq!(expired.status, Status::Critical);
        assert_eq!(expired.output, "TTL expired");
        assert!(start.elapsed() >= Duration::from_millis(300));

        assert_eq!(handle.ttl_update(Status::Passing, "all good").unwrap(), "all good");
        let passing = next_update(&mut rx).await;
        assert_eq!((passing.status, passing.output.as_str()), (Status::Passing, "all good"));
        let expired = next_update(&mut rx).await;
        assert_eq!(expired.status, Status::Critical);
        assert_eq!(expired.output, "TTL expired (last output before timeout follows): all good");
    }

    #[tokio::test]
    async fn ttl_update_resets_the_timer() {
        let ttl = Duration::from_secs(5);
        let (handle, mut rx) = spawn(r#"{"TTL": "5s"}"#, RunnerOptions::default());
        let handle = handle.unwrap();
        let start = Instant::now();
        handle.ttl_update(Status::Warning, "slow").unwrap();
        assert_eq!(next_update(&mut rx).await.status, Status::Warning);
        // Part of the scenario, not synchronisation: renew well before the TTL runs out.
        tokio::time::sleep(Duration::from_secs(1)).await;
        handle.ttl_update(Status::Passing, "ok").unwrap();
        let renewed_at = Instant::now();
        let passing = next_update(&mut rx).await;
        assert_eq!((passing.status, passing.output.as_str()), (Status::Passing, "ok"), "the renewal came before any expiry");
        let expired = next_update(&mut rx).await;
        assert_eq!(expired.status, Status::Critical);
        assert!(renewed_at.elapsed() >= ttl, "expired {:?} after the renewal", renewed_at.elapsed());
        assert!(start.elapsed() >= ttl + Duration::from_secs(1));
    }

    #[tokio::test]
    async fn identical_ttl_updates_renew_the_ttl_without_sending_anything() {
        let (handle, mut rx) = spawn(r#"{"TTL": "300ms"}"#, RunnerOptions::default());
        let handle = handle.unwrap();
        handle.ttl_update(Status::Passing, "ok").unwrap();
        assert_eq!(next_update(&mut rx).await.status, Status::Passing);
        handle.ttl_update(Status::Passing, "ok").unwrap();
        let next = next_update(&mut rx).await;
        assert_eq!(next.status, Status::Critical, "only the expiry follows: {next:?}");
    }

    #[tokio::test]
    async fn ttl_output_is_truncated_to_the_output_cap() {
        let (handle, mut rx) = spawn(r#"{"TTL": "1h", "OutputMaxSize": 5}"#, RunnerOptions::default());
        let handle = handle.unwrap();
        let stored = handle.ttl_update(Status::Passing, "abcdefghij").unwrap();
        assert_eq!(stored, "abcde ... (captured 5 of 10 bytes)");
        assert_eq!(next_update(&mut rx).await.output, stored);
    }

    #[tokio::test]
    async fn ttl_update_on_other_kinds_or_after_stop_fails() {
        let opts = RunnerOptions { alias_source: Some(Arc::new(TestAliasSource::default())), ..RunnerOptions::default() };
        let (alias, _rx) = spawn(r#"{"AliasNode": "n1"}"#, opts);
        assert_eq!(alias.unwrap().ttl_update(Status::Passing, ""), Err(CheckError::NotTtl("check".into())));
        let (ttl, _rx) = spawn(r#"{"TTL": "1h"}"#, RunnerOptions::default());
        let ttl = ttl.unwrap();
        ttl.stop();
        while !ttl.is_finished() {
            tokio::task::yield_now().await;
        }
        assert_eq!(ttl.ttl_update(Status::Passing, ""), Err(CheckError::Stopped("check".into())));
    }

    #[tokio::test]
    async fn stopped_runners_send_nothing_more() {
        let (handle, mut rx) = spawn(r#"{"TTL": "1h"}"#, RunnerOptions::default());
        let handle = handle.unwrap();
        handle.ttl_update(Status::Passing, "up").unwrap();
        assert_eq!(next_update(&mut rx).await.status, Status::Passing);
        handle.stop_and_wait().await;
        assert!(rx.recv().await.is_none(), "the runner dropped its sender");
    }

    #[derive(Default)]
    struct TestAliasSource {
        checks: Mutex<Vec<AliasedCheck>>,
        services: Mutex<Vec<String>>,
        failure: Mutex<Option<String>>,
        changes: Mutex<Option<watch::Sender<u64>>>,
    }

    impl TestAliasSource {
        fn set(&self, f: impl FnOnce(&mut Vec<AliasedCheck>)) {
            f(&mut self.checks.lock());
            if let Some(tx) = self.changes.lock().as_ref() {
                tx.send_modify(|n| *n += 1);
            }
        }
    }

    impl AliasSource for TestAliasSource {
        fn checks(&self, node: Option<&str>) -> Result<Vec<AliasedCheck>, String> {
            if let Some(e) = self.failure.lock().clone() {
                return Err(e);
            }
            let local = node.unwrap_or("local");
            Ok(self.checks.lock().iter().filter(|c| c.node == local).cloned().collect())
        }

        fn service_exists(&self, _node: Option<&str>, service_id: &str) -> bool {
            self.services.lock().iter().any(|s| s == service_id)
        }

        fn subscribe(&self) -> watch::Receiver<u64> {
            let mut guard = self.changes.lock();
            guard.get_or_insert_with(|| watch::channel(0).0).subscribe()
        }
    }

    fn aliased(node: &str, id: &str, service: &str, status: Status, output: &str) -> AliasedCheck {
        AliasedCheck { node: node.into(), check_id: id.into(), name: format!("{id} name"), service_id: service.into(), status, output: output.into() }
    }

    #[tokio::test]
    async fn alias_check_mirrors_the_worst_status_of_the_service_and_its_node() {
        let source = Arc::new(TestAliasSource::default());
        source.set(|c| {
            c.push(aliased("local", "web-http", "web", Status::Passing, "ok"));
            c.push(aliased("local", "db-tcp", "db", Status::Critical, "down"));
        });
        let opts = RunnerOptions { alias_source: Some(source.clone()), ..RunnerOptions::default() };
        let (handle, mut rx) = spawn(r#"{"AliasService": "web"}"#, opts);
        let _handle = handle.unwrap();
        let u = next_update(&mut rx).await;
        assert_eq!((u.status, u.output.as_str()), (Status::Passing, "All checks passing."));

        source.set(|c| c.push(aliased("local", "web-load", "web", Status::Warning, "busy")));
        let u = next_update(&mut rx).await;
        assert_eq!((u.status, u.output.as_str()), (Status::Warning, "Aliased check \"web-load name\" failing: busy"));

        source.set(|c| c.push(aliased("local", "serf", "", Status::Critical, "node down")));
        let u = next_update(&mut rx).await;
        assert_eq!((u.status, u.output.as_str()), (Status::Critical, "Aliased check \"serf name\" failing: node down"));

        source.set(|c| c.clear());
        let u = next_update(&mut rx).await;
        assert_eq!((u.status, u.output.as_str()), (Status::Critical, "Service web could not be found on the local node"));

        source.services.lock().push("web".into());
        source.set(|_| {});
        let u = next_update(&mut rx).await;
        assert_eq!((u.status, u.output.as_str()), (Status::Passing, "No checks found."));

        *source.failure.lock() = Some("no cluster leader".into());
        source.set(|_| {});
        let u = next_update(&mut rx).await;
        assert_eq!((u.status, u.output.as_str()), (Status::Critical, "Failure checking aliased node or service: no cluster leader"));
    }

    #[tokio::test]
    async fn alias_check_of_a_node_uses_only_its_node_level_checks() {
        let source = Arc::new(TestAliasSource::default());
        source.set(|c| {
            c.push(aliased("n2", "serf", "", Status::Passing, "alive"));
            c.push(aliased("n2", "web-http", "web", Status::Critical, "down"));
        });
        let opts = RunnerOptions { alias_source: Some(source.clone()), ..RunnerOptions::default() };
        let (handle, mut rx) = spawn(r#"{"AliasNode": "n2", "Status": "critical"}"#, opts);
        let _handle = handle.unwrap();
        let u = next_update(&mut rx).await;
        assert_eq!((u.status, u.output.as_str()), (Status::Passing, "All checks passing."));
        source.set(|c| c[0].status = Status::Critical);
        let u = next_update(&mut rx).await;
        assert_eq!(u.status, Status::Critical);
        assert_eq!(u.check_id, "check");
    }
}
