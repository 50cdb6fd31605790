//! Access logs (SPEC §9): one line per connection when it ends, in Istio's default text format
//! or a format given, with Envoy's command operators that apply at L4 (`%START_TIME%`,
//! `%DOWNSTREAM_REMOTE_ADDRESS%`, `%UPSTREAM_HOST%`, `%BYTES_SENT%`, `%RESPONSE_FLAGS%`, ...;
//! the HTTP ones print `-`, as Envoy prints them for a TCP connection). A format is parsed
//! once ([`Format::parse`]); a line is rendered from what the connection recorded
//! ([`Entry`]). Pure: no I/O, the time is in the entry. The thread that writes the lines, fed
//! by a bounded channel a worker never waits on, is [`writer`].

pub mod writer;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

/// Istio's default access log format (`EnvoyTextLogFormat`, pilot/pkg/model/telemetry_logging.go),
/// what istiod sends with `meshConfig.accessLogFile` and no `accessLogFormat`: one format for
/// HTTP and TCP, whose HTTP operators print `-` for a TCP connection.
pub const ISTIO_DEFAULT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% \
%PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \
\"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% \
%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \
\"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER_RAW% \
%UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% \
%REQUESTED_SERVER_NAME% %ROUTE_NAME%\n";

/// Envoy's default access log format: what a file logger without a format writes.
pub const ENVOY_DEFAULT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% \
%PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% \
%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \
\"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

/// A log's format: text, or a JSON object whose values are formats (Envoy's `json_format`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// One text line.
    Text(Format),
    /// One JSON object per line, its keys in order.
    Json(Vec<(String, Format)>),
}

impl LogFormat {
    /// `text`, or (when given) `json`'s keys and value formats; Istio's default text when
    /// neither is given.
    pub fn parse(
        text: Option<&str>,
        json: Option<&std::collections::BTreeMap<String, String>>,
    ) -> Result<LogFormat, Invalid> {
        match (text, json) {
            (_, Some(fields)) => fields
                .iter()
                .map(|(k, v)| Ok((k.clone(), Format::parse(v)?)))
                .collect::<Result<_, _>>()
                .map(LogFormat::Json),
            (Some(t), None) => Format::parse(t).map(LogFormat::Text),
            (None, None) => Ok(LogFormat::Text(Format::istio_default())),
        }
    }

    /// Append the line for `e` to `out`.
    pub fn render(&self, e: &Entry, out: &mut String) {
        let fields = match self {
            LogFormat::Text(f) => return f.render(e, out),
            LogFormat::Json(fields) => fields,
        };
        out.push('{');
        for (i, (key, format)) in fields.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            json_string(key, out);
            out.push(':');
            // A value that is one operator keeps its type, as Envoy's JSON formatter writes
            // it: a number, or null when the connection has none; anything else is a string.
            let mut value = String::new();
            format.render(e, &mut value);
            match format.pieces.as_slice() {
                [Piece::Op(op, None)] if value == "-" && !matches!(op, Op::ResponseFlags) => {
                    out.push_str("null")
                }
                [Piece::Op(Op::Duration | Op::BytesReceived | Op::BytesSent | Op::Zero, None)] => {
                    out.push_str(&value)
                }
                _ => json_string(&value, out),
            }
        }
        out.push_str("}\n");
    }
}

/// `s` as a JSON string.
fn json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A format that cannot be used: which operator and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// `%` opens an operator that is never closed.
    #[error("access log format: unterminated operator at byte {0}")]
    Unterminated(usize),
    /// An operator Envoy does not have, or that needs what L4 never sees.
    #[error("access log format: unsupported command operator %{0}%")]
    Unsupported(String),
    /// `START_TIME(...)` with a conversion ringside does not write.
    #[error("access log format: START_TIME conversion %{0} is not supported")]
    TimeConversion(char),
}

/// What one connection recorded for its line.
#[derive(Clone, Debug, Default)]
pub struct Entry {
    /// When it was accepted (wall clock).
    pub start: Option<SystemTime>,
    /// From accept to close.
    pub duration: Duration,
    /// The client's address.
    pub downstream_remote: Option<SocketAddr>,
    /// The address the client connected to (its original destination when captured).
    pub downstream_local: Option<SocketAddr>,
    /// The endpoint connected to.
    pub upstream_host: Option<SocketAddr>,
    /// The local address of the upstream connection.
    pub upstream_local: Option<SocketAddr>,
    /// The cluster routed to.
    pub upstream_cluster: Option<String>,
    /// Bytes received from the client.
    pub bytes_received: u64,
    /// Bytes sent to the client.
    pub bytes_sent: u64,
    /// Envoy's response flags (`-` for none).
    pub response_flags: &'static str,
    /// Why the connection was closed by a filter (`rbac_access_denied_matched_policy[...]`).
    pub termination_details: Option<String>,
    /// The TLS server name (SNI) the client asked for.
    pub requested_server_name: Option<String>,
    /// The client certificate's URI SAN (mTLS).
    pub peer_uri_san: Option<String>,
    /// Our certificate's URI SAN (mTLS).
    pub local_uri_san: Option<String>,
}

/// A parsed format: literal text and operators, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Format {
    pieces: Vec<Piece>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    /// An operator and its `:N` truncation.
    Op(Op, Option<usize>),
}

/// The command operators that mean something for a TCP connection, and those that print `-`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    /// `START_TIME`, or `START_TIME(FORMAT)`.
    StartTime(Option<Vec<TimePiece>>),
    Duration,
    BytesReceived,
    BytesSent,
    ResponseFlags,
    TerminationDetails,
    UpstreamHost,
    UpstreamCluster,
    UpstreamLocalAddress,
    DownstreamLocalAddress,
    DownstreamLocalAddressWithoutPort,
    DownstreamLocalPort,
    DownstreamRemoteAddress,
    DownstreamRemoteAddressWithoutPort,
    DownstreamRemotePort,
    RequestedServerName,
    PeerUriSan,
    LocalUriSan,
    /// `RESPONSE_CODE`, `UPSTREAM_REQUEST_ATTEMPT_COUNT`, ...: `0` with no request.
    Zero,
    /// Operators of HTTP requests (`REQ(...)`, `PROTOCOL`, `ROUTE_NAME`, ...): `-`.
    Absent,
}

/// One piece of a `START_TIME(...)` format: text, or a strftime conversion.
#[derive(Clone, Debug, PartialEq, Eq)]
enum TimePiece {
    Text(String),
    /// `%Y %m %d %H %M %S %s %z %Z %j`: the conversion character.
    Conversion(char),
    /// `%E<n>S` / `%<n>f` fractional seconds with `n` digits (`%f`: 9 digits).
    Fraction(usize),
}

impl Format {
    /// Istio's default format.
    pub fn istio_default() -> Format {
        // The constant is a valid format (a unit test parses it).
        Format::parse(ISTIO_DEFAULT_FORMAT).unwrap_or(Format { pieces: Vec::new() })
    }

    /// Parse a text format: text with `%OPERATOR%`, `%OPERATOR(ARG)%` and `%OPERATOR(ARG):N%`.
    pub fn parse(text: &str) -> Result<Format, Invalid> {
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        let mut at = 0;
        while let Some(i) = rest.find('%') {
            literal.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            // An operator runs to the next `%` outside its parentheses.
            let end = operator_end(after).ok_or(Invalid::Unterminated(at + i))?;
            let spec = &after[..end];
            if !literal.is_empty() {
                pieces.push(Piece::Text(std::mem::take(&mut literal)));
            }
            let (op, max) = operator(spec)?;
            pieces.push(Piece::Op(op, max));
            at += i + 1 + end + 1;
            rest = &after[end + 1..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            pieces.push(Piece::Text(literal));
        }
        Ok(Format { pieces })
    }

    /// Append the line for `e` to `out`.
    pub fn render(&self, e: &Entry, out: &mut String) {
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Op(op, max) => {
                    let start = out.len();
                    render_op(op, e, out);
                    if out.len() == start {
                        out.push('-');
                    }
                    if let Some(max) = max {
                        // Truncate on a character boundary at most `max` bytes in.
                        let mut cut = (start + max).min(out.len());
                        while !out.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        out.truncate(cut);
                    }
                }
            }
        }
    }
}

/// Where the operator that starts `s` (just after its `%`) ends: its closing `%`.
fn operator_end(s: &str) -> Option<usize> {
    let mut depth = 0u32;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            '%' if depth == 0 => return Some(i),
            _ => {}
        }
    }
    None
}

/// An operator spec (`NAME`, `NAME(ARG)`, `NAME(ARG):N`) as an [`Op`] and its truncation.
fn operator(spec: &str) -> Result<(Op, Option<usize>), Invalid> {
    let unsupported = || Invalid::Unsupported(spec.to_string());
    // `:N` after the name or its `(...)`: truncate to N bytes.
    let (head, max) = match spec.rsplit_once(':') {
        Some((h, n))
            if !n.is_empty()
                && n.bytes().all(|b| b.is_ascii_digit())
                && (h.ends_with(')') || !h.contains('(')) =>
        {
            (h, n.parse::<usize>().ok())
        }
        _ => (spec, None),
    };
    let (name, arg) = match head.split_once('(') {
        Some((n, a)) => (n, Some(a.strip_suffix(')').ok_or_else(unsupported)?)),
        None => (head, None),
    };
    let op = match (name, arg) {
        ("START_TIME", None) => Op::StartTime(None),
        ("START_TIME", Some(f)) => Op::StartTime(Some(time_format(f)?)),
        ("DURATION", None) => Op::Duration,
        ("BYTES_RECEIVED", None) => Op::BytesReceived,
        ("BYTES_SENT", None) => Op::BytesSent,
        ("RESPONSE_FLAGS", None) => Op::ResponseFlags,
        ("CONNECTION_TERMINATION_DETAILS", None) => Op::TerminationDetails,
        ("UPSTREAM_HOST" | "UPSTREAM_REMOTE_ADDRESS", None) => Op::UpstreamHost,
        ("UPSTREAM_CLUSTER" | "UPSTREAM_CLUSTER_RAW", None) => Op::UpstreamCluster,
        ("UPSTREAM_LOCAL_ADDRESS", None) => Op::UpstreamLocalAddress,
        ("DOWNSTREAM_LOCAL_ADDRESS", None) => Op::DownstreamLocalAddress,
        ("DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT", None) => Op::DownstreamLocalAddressWithoutPort,
        ("DOWNSTREAM_LOCAL_PORT", None) => Op::DownstreamLocalPort,
        ("DOWNSTREAM_REMOTE_ADDRESS" | "DOWNSTREAM_DIRECT_REMOTE_ADDRESS", None) => {
            Op::DownstreamRemoteAddress
        }
        (
            "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" | "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT",
            None,
        ) => Op::DownstreamRemoteAddressWithoutPort,
        ("DOWNSTREAM_REMOTE_PORT" | "DOWNSTREAM_DIRECT_REMOTE_PORT", None) => Op::DownstreamRemotePort,
        ("REQUESTED_SERVER_NAME", None) => Op::RequestedServerName,
        ("DOWNSTREAM_PEER_URI_SAN", None) => Op::PeerUriSan,
        ("DOWNSTREAM_LOCAL_URI_SAN", None) => Op::LocalUriSan,
        ("RESPONSE_CODE" | "UPSTREAM_REQUEST_ATTEMPT_COUNT", None) => Op::Zero,
        ("REQ" | "RESP" | "TRAILER", Some(_)) => Op::Absent,
        (
            "PROTOCOL"
            | "UPSTREAM_PROTOCOL"
            | "RESPONSE_CODE_DETAILS"
            | "ROUTE_NAME"
            | "VIRTUAL_CLUSTER_NAME"
            | "UPSTREAM_TRANSPORT_FAILURE_REASON"
            | "REQUEST_DURATION"
            | "RESPONSE_DURATION"
            | "RESPONSE_TX_DURATION"
            | "REQUEST_TX_DURATION"
            | "GRPC_STATUS"
            | "UPSTREAM_SERVICE_TIME",
            None,
        ) => Op::Absent,
        _ => return Err(unsupported()),
    };
    Ok((op, max))
}

/// A `START_TIME(...)` strftime format, in the conversions ringside writes.
fn time_format(f: &str) -> Result<Vec<TimePiece>, Invalid> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut chars = f.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            text.push(c);
            continue;
        }
        let piece = match chars.next() {
            Some('%') => {
                text.push('%');
                continue;
            }
            Some(c @ ('Y' | 'm' | 'd' | 'H' | 'M' | 'S' | 's' | 'z' | 'Z' | 'j')) => TimePiece::Conversion(c),
            Some('f') => TimePiece::Fraction(9),
            Some('E') => {
                let n = chars.next().and_then(|d| d.to_digit(10)).ok_or(Invalid::TimeConversion('E'))?;
                if chars.next() != Some('S') {
                    return Err(Invalid::TimeConversion('E'));
                }
                // `%E3S`: seconds with 3 fractional digits.
                out.push(TimePiece::Text(std::mem::take(&mut text)));
                out.push(TimePiece::Conversion('S'));
                out.push(TimePiece::Text(".".into()));
                TimePiece::Fraction(n as usize)
            }
            Some(d @ '1'..='9') => match chars.next() {
                Some('f') => TimePiece::Fraction(d.to_digit(10).map_or(9, |n| n as usize)),
                _ => return Err(Invalid::TimeConversion(d)),
            },
            Some(other) => return Err(Invalid::TimeConversion(other)),
            None => return Err(Invalid::TimeConversion('%')),
        };
        if !text.is_empty() {
            out.push(TimePiece::Text(std::mem::take(&mut text)));
        }
        out.push(piece);
    }
    if !text.is_empty() {
        out.push(TimePiece::Text(text));
    }
    out.retain(|p| *p != TimePiece::Text(String::new()));
    Ok(out)
}

/// Append what `op` says of `e` (nothing: the caller writes `-`).
fn render_op(op: &Op, e: &Entry, out: &mut String) {
    let addr = |out: &mut String, a: Option<SocketAddr>| {
        if let Some(a) = a {
            let _ = write!(out, "{a}");
        }
    };
    let text = |out: &mut String, t: Option<&str>| out.push_str(t.unwrap_or_default());
    match op {
        Op::StartTime(f) => {
            if let Some(t) = e.start {
                start_time(t, f.as_deref(), out);
            }
        }
        Op::Duration => {
            let _ = write!(out, "{}", e.duration.as_millis());
        }
        Op::BytesReceived => {
            let _ = write!(out, "{}", e.bytes_received);
        }
        Op::BytesSent => {
            let _ = write!(out, "{}", e.bytes_sent);
        }
        Op::ResponseFlags => out.push_str(e.response_flags),
        Op::TerminationDetails => text(out, e.termination_details.as_deref()),
        Op::UpstreamHost => addr(out, e.upstream_host),
        Op::UpstreamCluster => text(out, e.upstream_cluster.as_deref()),
        Op::UpstreamLocalAddress => addr(out, e.upstream_local),
        Op::DownstreamLocalAddress => addr(out, e.downstream_local),
        Op::DownstreamLocalAddressWithoutPort => {
            if let Some(a) = e.downstream_local {
                let _ = write!(out, "{}", a.ip());
            }
        }
        Op::DownstreamLocalPort => {
            if let Some(a) = e.downstream_local {
                let _ = write!(out, "{}", a.port());
            }
        }
        Op::DownstreamRemoteAddress => addr(out, e.downstream_remote),
        Op::DownstreamRemoteAddressWithoutPort => {
            if let Some(a) = e.downstream_remote {
                let _ = write!(out, "{}", a.ip());
            }
        }
        Op::DownstreamRemotePort => {
            if let Some(a) = e.downstream_remote {
                let _ = write!(out, "{}", a.port());
            }
        }
        Op::RequestedServerName => text(out, e.requested_server_name.as_deref()),
        Op::PeerUriSan => text(out, e.peer_uri_san.as_deref()),
        Op::LocalUriSan => text(out, e.local_uri_san.as_deref()),
        Op::Zero => out.push('0'),
        Op::Absent => {}
    }
}

/// `t` in UTC: Envoy's default `%Y-%m-%dT%H:%M:%E3SZ`, or `format`.
fn start_time(t: SystemTime, format: Option<&[TimePiece]>, out: &mut String) {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil(secs / 86_400);
    let of_day = secs % 86_400;
    let (h, m, s) = (of_day / 3600, of_day % 3600 / 60, of_day % 60);
    let Some(format) = format else {
        let ms = since.subsec_millis();
        let _ = write!(out, "{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{ms:03}Z");
        return;
    };
    for piece in format {
        let _ = match piece {
            TimePiece::Text(t) => out.write_str(t),
            TimePiece::Conversion('Y') => write!(out, "{year:04}"),
            TimePiece::Conversion('m') => write!(out, "{month:02}"),
            TimePiece::Conversion('d') => write!(out, "{day:02}"),
            TimePiece::Conversion('H') => write!(out, "{h:02}"),
            TimePiece::Conversion('M') => write!(out, "{m:02}"),
            TimePiece::Conversion('S') => write!(out, "{s:02}"),
            TimePiece::Conversion('s') => write!(out, "{secs}"),
            TimePiece::Conversion('z') => out.write_str("+0000"),
            TimePiece::Conversion('Z') => out.write_str("UTC"),
            TimePiece::Conversion('j') => {
                let (jan1, ..) = (days_from_civil(year, 1, 1), ());
                write!(out, "{:03}", secs / 86_400 - jan1 + 1)
            }
            TimePiece::Conversion(_) => Ok(()),
            TimePiece::Fraction(n) => {
                let nanos = format!("{:09}", since.subsec_nanos());
                out.write_str(nanos.get(..(*n).min(9)).unwrap_or_default())
            }
        };
    }
}

/// The civil date (year, month, day) of day `days` since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for days on or after the epoch).
fn civil(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Days since 1970-01-01 of a civil date on or after it (the inverse of [`civil`]).
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe).saturating_sub(719_468)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            // 2020-11-25T21:26:18.409Z
            start: Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_606_339_578_409)),
            duration: Duration::from_millis(25),
            downstream_remote: Some("10.44.1.23:37650".parse().unwrap()),
            downstream_local: Some("10.0.2.163:3306".parse().unwrap()),
            upstream_host: Some("10.44.1.27:3306".parse().unwrap()),
            upstream_local: Some("10.44.1.23:37652".parse().unwrap()),
            upstream_cluster: Some("outbound|3306||mysqldb.default.svc.cluster.local".into()),
            bytes_received: 110,
            bytes_sent: 121,
            response_flags: "-",
            ..Entry::default()
        }
    }

    fn line(format: &str, e: &Entry) -> String {
        let mut out = String::new();
        Format::parse(format).unwrap().render(e, &mut out);
        out
    }

    #[test]
    fn istios_default_format_writes_a_tcp_connection_as_envoy_does() {
        // The line of Istio's access log task for a TCP (MySQL) connection.
        assert_eq!(
            line(ISTIO_DEFAULT_FORMAT, &entry()),
            "[2020-11-25T21:26:18.409Z] \"- - -\" 0 - - - \"-\" 110 121 25 - \"-\" \"-\" \"-\" \"-\" \
             \"10.44.1.27:3306\" outbound|3306||mysqldb.default.svc.cluster.local 10.44.1.23:37652 \
             10.0.2.163:3306 10.44.1.23:37650 - -\n"
        );
        assert_eq!(Format::istio_default(), Format::parse(ISTIO_DEFAULT_FORMAT).unwrap());
    }

    #[test]
    fn each_l4_operator_writes_its_value_and_a_missing_one_a_dash() {
        let mut e = entry();
        e.response_flags = "UF";
        e.termination_details = Some("rbac_access_denied_matched_policy[none]".into());
        e.requested_server_name = Some("outbound_.3306_._.mysqldb".into());
        e.peer_uri_san = Some("spiffe://cluster.local/ns/default/sa/client".into());
        let ops = "%RESPONSE_FLAGS% %CONNECTION_TERMINATION_DETAILS% %REQUESTED_SERVER_NAME% \
                   %DOWNSTREAM_PEER_URI_SAN% %DOWNSTREAM_LOCAL_URI_SAN% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% \
                   %DOWNSTREAM_LOCAL_PORT% %DOWNSTREAM_REMOTE_PORT% %UPSTREAM_CLUSTER% %UPSTREAM_CLUSTER:8%";
        assert_eq!(
            line(ops, &e),
            "UF rbac_access_denied_matched_policy[none] outbound_.3306_._.mysqldb \
             spiffe://cluster.local/ns/default/sa/client - 10.44.1.23 3306 37650 \
             outbound|3306||mysqldb.default.svc.cluster.local outbound"
        );
        // Nothing connected (NR): every upstream operator is `-`.
        let nothing = Entry { response_flags: "NR", start: e.start, ..Entry::default() };
        assert_eq!(
            line(
                "%UPSTREAM_HOST% %UPSTREAM_CLUSTER% %UPSTREAM_LOCAL_ADDRESS% %BYTES_SENT% %RESPONSE_FLAGS%",
                &nothing
            ),
            "- - - 0 NR"
        );
    }

    #[test]
    fn start_time_takes_strftime_conversions_in_utc() {
        let e = entry();
        assert_eq!(line("%START_TIME(%Y/%m/%dT%H:%M:%S%z)%", &e), "2020/11/25T21:26:18+0000");
        assert_eq!(line("%START_TIME(%s.%3f)%", &e), "1606339578.409");
        assert_eq!(line("%START_TIME(%E6S|%j|%%)%", &e), "18.409000|330|%");
        // Leap day and the turn of a century.
        let at = |secs: u64| Entry {
            start: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs)),
            ..Entry::default()
        };
        assert_eq!(line("%START_TIME%", &at(951_782_400)), "2000-02-29T00:00:00.000Z");
        assert_eq!(line("%START_TIME%", &at(4_102_444_799)), "2099-12-31T23:59:59.000Z");
    }

    #[test]
    fn an_unknown_or_unterminated_operator_is_invalid() {
        assert_eq!(Format::parse("%FILTER_STATE(x)%"), Err(Invalid::Unsupported("FILTER_STATE(x)".into())));
        assert_eq!(Format::parse("a %BYTES_SENT"), Err(Invalid::Unterminated(2)));
        assert_eq!(Format::parse("%START_TIME(%Q)%"), Err(Invalid::TimeConversion('Q')));
        assert!(Format::parse("plain text, no operator\n").is_ok());
    }

    #[test]
    fn a_json_format_keeps_numbers_as_numbers_and_writes_null_for_what_is_missing() {
        let fields: std::collections::BTreeMap<String, String> = [
            ("bytes_sent", "%BYTES_SENT%"),
            ("cluster", "%UPSTREAM_CLUSTER%"),
            ("flags", "%RESPONSE_FLAGS%"),
            ("method", "%REQ(:METHOD)%"),
            ("pair", "%DOWNSTREAM_REMOTE_ADDRESS% -> \"%UPSTREAM_HOST%\""),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let f = LogFormat::parse(None, Some(&fields)).unwrap();
        let mut out = String::new();
        f.render(&entry(), &mut out);
        assert_eq!(
            out,
            "{\"bytes_sent\":121,\"cluster\":\"outbound|3306||mysqldb.default.svc.cluster.local\",\"flags\":\"-\",\
             \"method\":null,\"pair\":\"10.44.1.23:37650 -> \\\"10.44.1.27:3306\\\"\"}\n"
        );
        assert_eq!(LogFormat::parse(None, None).unwrap(), LogFormat::Text(Format::istio_default()));
    }
}
