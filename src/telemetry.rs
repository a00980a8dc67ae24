//! Tracing subscriber setup: a `RUST_LOG`-style filter (the env var wins over `log.level`),
//! one human line per event (`pretty`) or one JSON object per line (`json`), to stderr.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. Returns false if one was already installed.
pub fn init(config: &LogConfig) -> bool {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_span_events(FmtSpan::NONE);
    match config.format {
        LogFormat::Pretty => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init()
            .is_ok(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .try_init()
            .is_ok(),
    }
}

/// Untrusted text (upstream close reasons and refusal bodies, client-chosen names) for a log
/// field: control characters become escapes (`\n`, `\u{1b}`), so one event stays one line,
/// and the text is cut at `max` characters (`…` marks the cut).
pub fn escape(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max) + 8);
    for (i, c) in text.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod escape_tests {
    #[test]
    fn control_characters_are_escaped_and_length_capped() {
        assert_eq!(super::escape("a\nb\x1b[31m", 100), "a\\nb\\u{1b}[31m");
        assert_eq!(super::escape("abcdef", 3), "abc…");
        assert_eq!(super::escape("plain", 10), "plain");
    }
}
