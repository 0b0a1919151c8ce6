//! The agent's logs: written to stderr at the configured level (`log_level`, or `TRELLIS_LOG`
//! as a full filter), and fed live to `/v1/agent/monitor` readers, each at its own level,
//! whatever the configured one. The feed costs nothing while no monitor is attached.

use std::fmt::Write as _;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::broadcast;
use tracing::{Level, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

/// Lines a slow monitor may fall behind by before it is told it missed some.
const FEED_CAPACITY: usize = 1024;

/// One formatted log line.
#[derive(Debug, Clone)]
pub struct LogLine {
    pub level: Level,
    pub text: String,
    pub json: String,
}

static FEED: LazyLock<broadcast::Sender<std::sync::Arc<LogLine>>> = LazyLock::new(|| broadcast::channel(FEED_CAPACITY).0);

/// Attached monitors per level (TRACE, DEBUG, INFO, WARN, ERROR).
static MONITORS: [AtomicUsize; 5] = [const { AtomicUsize::new(0) }; 5];

fn slot(l: Level) -> usize {
    match l {
        Level::TRACE => 0,
        Level::DEBUG => 1,
        Level::INFO => 2,
        Level::WARN => 3,
        Level::ERROR => 4,
    }
}

/// Whether some monitor wants events at `level`.
fn wanted(level: &Level) -> bool {
    // A monitor at DEBUG wants DEBUG and everything above it.
    MONITORS[..=slot(*level)].iter().any(|m| m.load(Ordering::Relaxed) > 0)
}

/// Parse a monitor level as Consul names them.
pub fn parse_level(s: &str) -> Option<Level> {
    match s.to_ascii_lowercase().as_str() {
        "trace" => Some(Level::TRACE),
        "debug" => Some(Level::DEBUG),
        "" | "info" => Some(Level::INFO),
        "warn" | "warning" => Some(Level::WARN),
        "err" | "error" => Some(Level::ERROR),
        _ => None,
    }
}

/// A live feed of log lines at `level` and above, until dropped.
pub struct Monitor {
    level: Level,
    rx: broadcast::Receiver<std::sync::Arc<LogLine>>,
}

impl Monitor {
    pub fn attach(level: Level) -> Monitor {
        MONITORS[slot(level)].fetch_add(1, Ordering::Relaxed);
        Monitor { level, rx: FEED.subscribe() }
    }

    /// The next line for this monitor; `Err(n)` when it fell behind and `n` lines were lost.
    pub async fn next(&mut self) -> Option<Result<std::sync::Arc<LogLine>, u64>> {
        loop {
            match self.rx.recv().await {
                Ok(line) if line.level <= self.level => return Some(Ok(line)),
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(n)) => return Some(Err(n)),
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        MONITORS[slot(self.level)].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Collects an event's message and fields.
#[derive(Default)]
struct Fields {
    message: String,
    rest: Vec<(String, String)>,
}

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            self.rest.push((field.name().to_string(), format!("{value:?}")));
        }
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.rest.push((field.name().to_string(), value.to_string()));
        }
    }
}

/// The layer that feeds monitors.
struct FeedLayer;

impl<S: Subscriber> Layer<S> for FeedLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let level = *event.metadata().level();
        if !wanted(&level) || FEED.receiver_count() == 0 {
            return;
        }
        let mut f = Fields::default();
        event.record(&mut f);
        let now = crate::duration::rfc3339(std::time::SystemTime::now());
        let mut text = format!("{now} [{level}] {}: {}", event.metadata().target(), f.message);
        for (k, v) in &f.rest {
            let _ = write!(text, " {k}={v}");
        }
        let mut obj = serde_json::Map::new();
        obj.insert("@timestamp".into(), now.into());
        obj.insert("@level".into(), level.as_str().to_ascii_lowercase().into());
        obj.insert("@module".into(), event.metadata().target().into());
        obj.insert("@message".into(), f.message.clone().into());
        for (k, v) in f.rest {
            obj.insert(k, v.into());
        }
        let json = serde_json::Value::Object(obj).to_string();
        let _ = FEED.send(std::sync::Arc::new(LogLine { level, text, json }));
    }
}

/// Install the process's logging: stderr at `level` (or `TRELLIS_LOG`), plus the monitor feed.
pub fn init(level: &str, quiet_directives: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TRELLIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{level},openraft=error,{quiet_directives}")));
    let stderr = tracing_subscriber::fmt::layer().with_target(false).with_filter(filter);
    // Monitors see everything at their level except the per-request chatter of libraries.
    let feed_filter =
        tracing_subscriber::filter::filter_fn(|m| wanted(m.level()) && !m.target().starts_with("hickory") && !m.target().starts_with("h2"));
    let _ = tracing_subscriber::registry().with(stderr).with(FeedLayer.with_filter(feed_filter)).try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_as_consul_names_them() {
        assert_eq!(parse_level("err"), Some(Level::ERROR));
        assert_eq!(parse_level("DEBUG"), Some(Level::DEBUG));
        assert_eq!(parse_level(""), Some(Level::INFO));
        assert_eq!(parse_level("loud"), None);
    }

    #[test]
    fn monitors_register_the_levels_they_want() {
        assert!(!wanted(&Level::TRACE) || MONITORS[0].load(Ordering::Relaxed) > 0);
        let m = Monitor::attach(Level::DEBUG);
        assert!(wanted(&Level::DEBUG) && wanted(&Level::ERROR));
        drop(m);
    }
}
