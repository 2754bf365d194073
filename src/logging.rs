//! Log set-up shared by every command: text or JSON lines on stderr, colour only on a terminal, and
//! every value a peer can influence escaped so it can never start a line of its own.
//!
//! Peer-supplied strings reach the logs as field values (a SOCKS5 domain name, an HTTP target, an
//! agent id, a TLS error). Logged with `%` they are written as they are, so a name holding a newline
//! and ANSI escapes could forge a whole `INFO postern::access … result=ok` line in a text log. The
//! text format here escapes control characters in every field (messages included); JSON escapes by
//! construction.

use std::fmt::{self, Write as _};
use std::io::IsTerminal as _;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::FormatFields;

/// The two log formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `2026-11-25T… INFO target: message key=value …`, one event per line.
    Text,
    /// One JSON object per line (tracing-subscriber's JSON format).
    Json,
}

/// Installs the process's subscriber: `RUST_LOG` filter (default `info`), stderr, the chosen format.
/// Text is coloured only when stderr is a terminal and `NO_COLOR` is unset, so files and the journal
/// get plain lines.
pub fn init(format: Format) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        Format::Text => builder
            .with_ansi(colour_wanted())
            .fmt_fields(EscapedFields)
            .init(),
        Format::Json => builder.json().init(),
    }
}

/// Colour only for a person at a terminal (<https://no-color.org>).
fn colour_wanted() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").map_or(true, |v| v.is_empty())
}

/// Reports an error that ends the process, in the chosen format: a JSON line for JSON logs (so a log
/// pipeline never meets a stray plain line), `postern: …` on stderr for text.
pub fn fatal(format: Format, err: &dyn fmt::Display) {
    match format {
        Format::Json => tracing::error!(target: "postern", error = %err, "fatal error; exiting"),
        Format::Text => {
            // Several config errors come one per line; each line is escaped on its own.
            let text = err.to_string();
            let lines: Vec<_> = text.lines().map(escape).collect();
            eprintln!("postern: {}", lines.join("\n"));
        }
    }
}

/// An error and its causes as one line, `outer: cause: root`, leaving out a cause whose text the
/// line already ends with: many errors include their source in their own message (`cannot read F:
/// No such file`), and printing the chain as well would say it twice.
pub fn chain<'a>(
    errors: impl IntoIterator<Item = &'a (dyn std::error::Error + 'static)>,
) -> String {
    let mut line = String::new();
    for err in errors {
        let text = err.to_string();
        if line.ends_with(&text) || line.contains(&format!("{text}: ")) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// `text` with every control character (newline, carriage return, ESC, DEL, C1 controls …)
/// written as a Rust escape (`\n`, `\u{1b}`); everything else as it is.
pub fn escape(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            // Writing into a String cannot fail.
            let _ = write!(out, "{}", c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The text format's fields, as tracing-subscriber's default writes them (`message key=value …`,
/// strings `Debug`-quoted), but with control characters escaped in every value.
pub struct EscapedFields;

impl<'writer> FormatFields<'writer> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = EscapingVisitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct EscapingVisitor<'writer> {
    writer: Writer<'writer>,
    first: bool,
    result: fmt::Result,
}

impl EscapingVisitor<'_> {
    fn write(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        let separator = if self.first { "" } else { " " };
        self.first = false;
        let name = field.name();
        self.result = if name == "message" {
            write!(self.writer, "{separator}{}", escape(value))
        } else {
            // `r#type` and the like are logged without the raw-identifier prefix.
            let name = name.strip_prefix("r#").unwrap_or(name);
            write!(self.writer, "{separator}{name}={}", escape(value))
        };
    }
}

impl Visit for EscapingVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.write(field, value);
        } else {
            // Quoted, as the default format writes string fields.
            self.write(field, &format!("{value:?}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.write(field, &format!("{value:?}"));
    }
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn control_characters_are_escaped_and_the_rest_is_kept() {
        assert_eq!(escape("plain näme.postern"), "plain näme.postern");
        let forged = "x\n2026-11-25T00:00:00Z  INFO postern::access: result=ok\u{1b}[2K\r";
        let escaped = escape(forged);
        assert!(!escaped.chars().any(char::is_control), "{escaped}");
        assert_eq!(
            escaped,
            "x\\n2026-11-25T00:00:00Z  INFO postern::access: result=ok\\u{1b}[2K\\r"
        );
        assert_eq!(escape("a\u{7f}\u{85}b"), "a\\u{7f}\\u{85}b");
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let root = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let err = anyhow::Error::new(root).context("cannot read /x: No such file");
        let err = err.context("peer.ca");
        assert_eq!(
            super::chain(err.chain()),
            "peer.ca: cannot read /x: No such file"
        );
        let err = anyhow::anyhow!("inner").context("outer");
        assert_eq!(super::chain(err.chain()), "outer: inner");
    }
}
