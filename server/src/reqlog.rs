//! The request log line: one per request, in the layout tracing's formatter gives every other
//! line (`2026-12-02T12:56:08.214609Z  INFO request peer=… actor="…" request_id="…"
//! method=GET path="…" status=200 bytes=512 ms=0.412`), written straight into the log buffer
//! when the binary set one up (`logbuf`): the formatter's field visitors, dynamic dispatch
//! and time formatting were about a tenth of a small request's CPU. The level filter still
//! decides (`log = "warn"` silences these lines); without a log buffer (the library in tests
//! and benchmarks) the line goes through tracing as before.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

/// What a request line says.
pub struct Line<'a> {
    /// The client's address.
    pub peer: SocketAddr,
    /// Who asked, as the audit log names them.
    pub actor: &'a str,
    /// The request's id.
    pub request_id: &'a str,
    /// The method.
    pub method: &'a str,
    /// The path.
    pub path: &'a str,
    /// The answer's status.
    pub status: u16,
    /// The answer's length, when known.
    pub bytes: Option<u64>,
    /// How long it took.
    pub secs: f64,
}

/// Logs a request line (at INFO).
pub fn emit(l: &Line<'_>) {
    if !tracing::enabled!(tracing::Level::INFO) {
        return;
    }
    match crate::logbuf::request_sink() {
        Some(sink) => {
            let mut buf = Vec::with_capacity(160 + l.path.len());
            format(&mut buf, SystemTime::now(), l);
            let _ = sink.clone().write_all(&buf);
        }
        None => tracing::info!(
            peer = %l.peer,
            actor = l.actor,
            request_id = l.request_id,
            method = l.method,
            path = l.path,
            status = l.status,
            bytes = l.bytes,
            ms = %format_args!("{:.3}", l.secs * 1000.0),
            "request"
        ),
    }
}

/// Appends `n` in decimal, at least `width` digits.
fn number(buf: &mut Vec<u8>, mut n: u64, width: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 && digits.len() - i >= width {
            break;
        }
    }
    buf.extend_from_slice(&digits[i..]);
}

/// Appends `s` as a quoted string the way `{:?}` writes it (quotes, backslashes and control
/// characters escaped), so a line can never be split or forged by what a client sent.
fn quoted(buf: &mut Vec<u8>, s: &str) {
    buf.push(b'"');
    for c in s.chars() {
        match c {
            '"' => buf.extend_from_slice(b"\\\""),
            '\\' => buf.extend_from_slice(b"\\\\"),
            '\n' => buf.extend_from_slice(b"\\n"),
            '\r' => buf.extend_from_slice(b"\\r"),
            '\t' => buf.extend_from_slice(b"\\t"),
            c if c.is_control() => {
                let mut esc = String::new();
                let _ = write!(esc, "\\u{{{:x}}}", c as u32);
                buf.extend_from_slice(esc.as_bytes());
            }
            c => {
                let mut utf8 = [0u8; 4];
                buf.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
            }
        }
    }
    buf.push(b'"');
}

/// Appends a time as RFC 3339 in UTC with microseconds (`2026-12-02T12:56:08.214609Z`).
fn timestamp(buf: &mut Vec<u8>, t: SystemTime) {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (Howard Hinnant's algorithm, days since 1970-01-01).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    number(buf, year.max(0) as u64, 4);
    buf.push(b'-');
    number(buf, month as u64, 2);
    buf.push(b'-');
    number(buf, day as u64, 2);
    buf.push(b'T');
    number(buf, rem / 3600, 2);
    buf.push(b':');
    number(buf, rem % 3600 / 60, 2);
    buf.push(b':');
    number(buf, rem % 60, 2);
    buf.push(b'.');
    number(buf, u64::from(since.subsec_micros()), 6);
    buf.push(b'Z');
}

/// The whole line, with its newline.
fn format(buf: &mut Vec<u8>, now: SystemTime, l: &Line<'_>) {
    timestamp(buf, now);
    buf.extend_from_slice(b"  INFO request peer=");
    match l.peer {
        SocketAddr::V4(a) => {
            for (i, o) in a.ip().octets().iter().enumerate() {
                if i > 0 {
                    buf.push(b'.');
                }
                number(buf, u64::from(*o), 1);
            }
            buf.push(b':');
            number(buf, u64::from(a.port()), 1);
        }
        SocketAddr::V6(a) => {
            let _ = write!(buf, "{a}");
        }
    }
    buf.extend_from_slice(b" actor=");
    quoted(buf, l.actor);
    buf.extend_from_slice(b" request_id=");
    quoted(buf, l.request_id);
    buf.extend_from_slice(b" method=");
    buf.extend_from_slice(l.method.as_bytes());
    buf.extend_from_slice(b" path=");
    quoted(buf, l.path);
    buf.extend_from_slice(b" status=");
    number(buf, u64::from(l.status), 1);
    if let Some(b) = l.bytes {
        buf.extend_from_slice(b" bytes=");
        number(buf, b, 1);
    }
    buf.extend_from_slice(b" ms=");
    let micros = (l.secs * 1_000_000.0).round() as u64;
    number(buf, micros / 1000, 1);
    buf.push(b'.');
    number(buf, micros % 1000, 3);
    buf.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_has_tracings_layout_and_escapes_what_clients_sent() {
        let l = Line {
            peer: "127.0.0.1:40796".parse().expect("addr"),
            actor: "user:a\"b\nc",
            request_id: "5c344b25e11f652d",
            method: "GET",
            path: "/v2/a/manifests/v1",
            status: 200,
            bytes: Some(512),
            secs: 0.001_234_5,
        };
        let t = UNIX_EPOCH + std::time::Duration::from_micros(1_796_216_168_214_609);
        let mut buf = Vec::new();
        format(&mut buf, t, &l);
        let line = String::from_utf8(buf).expect("utf-8");
        assert_eq!(
            line,
            "2026-12-02T12:56:08.214609Z  INFO request peer=127.0.0.1:40796 \
             actor=\"user:a\\\"b\\nc\" request_id=\"5c344b25e11f652d\" method=GET \
             path=\"/v2/a/manifests/v1\" status=200 bytes=512 ms=1.235\n"
        );
        // The time agrees with humantime's reading of it; a line without a length has no
        // `bytes` field.
        let ts = &line[..27];
        assert_eq!(humantime::parse_rfc3339(ts).expect("rfc3339"), t);
        let mut buf = Vec::new();
        format(&mut buf, t, &Line { bytes: None, ..l });
        assert!(!String::from_utf8_lossy(&buf).contains("bytes="));
        let mut buf = Vec::new();
        quoted(&mut buf, "\u{1b}[2J\\");
        assert_eq!(buf, b"\"\\u{1b}[2J\\\\\"");
        for days in [0u64, 59, 60, 365, 11_016, 20_454, 36_524, 100_000] {
            let t = UNIX_EPOCH + std::time::Duration::from_secs(days * 86_400 + 3_723);
            let mut buf = Vec::new();
            timestamp(&mut buf, t);
            let s = String::from_utf8(buf).expect("utf-8");
            assert_eq!(
                humantime::parse_rfc3339(&s).expect("rfc3339"),
                t,
                "{s} for day {days}"
            );
        }
    }
}
