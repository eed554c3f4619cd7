//! Reading a container's CRI log as `kubectl logs` asks for it (the kubelet's ReadLogs): the
//! options of the node API's `/containerLogs` query (tailLines, sinceSeconds/sinceTime,
//! timestamps, limitBytes, follow, previous) and what they select from a CRI log file.
//! Pure: the caller reads the file and passes the clock. The first part of issue 12's
//! `/containerLogs` and `wasmlet logs`.

use std::time::{Duration, SystemTime};

/// A CRI log record: `<RFC 3339 time> <stdout|stderr> <P|F> <text>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    pub time: SystemTime,
    /// The time as written (kept for `timestamps=true`).
    pub time_text: &'a str,
    pub stream: &'a str,
    /// A partial record: the line goes on in the next one.
    pub partial: bool,
    pub text: &'a [u8],
}

/// Parses one record (without its newline).
pub fn parse_record(line: &[u8]) -> Result<Record<'_>, String> {
    let bad = |why: &str| format!("invalid CRI log record {:?}: {why}", String::from_utf8_lossy(line));
    let mut parts = line.splitn(4, |b| *b == b' ');
    let time_text = std::str::from_utf8(parts.next().unwrap_or_default()).map_err(|_| bad("time"))?;
    let stream = std::str::from_utf8(parts.next().ok_or_else(|| bad("no stream"))?).map_err(|_| bad("stream"))?;
    if stream != "stdout" && stream != "stderr" {
        return Err(bad("the stream is neither stdout nor stderr"));
    }
    let tag = parts.next().ok_or_else(|| bad("no tag"))?;
    // Tags may carry more flags after ':'; the first says partial (P) or full (F).
    let partial = match tag.split(|b| *b == b':').next() {
        Some(b"P") => true,
        Some(b"F") => false,
        _ => return Err(bad("the tag is neither P nor F")),
    };
    let time = time_text.parse::<k8s_openapi::jiff::Timestamp>().map_err(|_| bad("the time is not RFC 3339"))?;
    let time = SystemTime::from(time);
    Ok(Record { time, time_text, stream, partial, text: parts.next().unwrap_or_default() })
}

/// Which streams to return.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Streams {
    #[default]
    All,
    Stdout,
    Stderr,
}

/// What `kubectl logs` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogOptions {
    pub follow: bool,
    pub previous: bool,
    /// The last N lines of the file (records); None: all.
    pub tail_lines: Option<u64>,
    /// Records at or after this time.
    pub since: Option<SystemTime>,
    pub timestamps: bool,
    /// At most this many bytes of output.
    pub limit_bytes: Option<u64>,
    pub streams: Streams,
}

fn boolean(name: &str, v: &str) -> Result<bool, String> {
    match v {
        "" | "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(format!("{name}: {v:?} is not a boolean")),
    }
}

fn natural(name: &str, v: &str, min: i64) -> Result<i64, String> {
    let n: i64 = v.parse().map_err(|_| format!("{name}: {v:?} is not an integer"))?;
    if n < min {
        return Err(format!("{name}: must be greater than or equal to {min}, not {n}"));
    }
    Ok(n)
}

impl LogOptions {
    /// The options of a `/containerLogs` query string (already split into decoded pairs), as
    /// the API server's PodLogOptions validation words its refusals; `now` turns
    /// sinceSeconds into a time.
    pub fn from_query<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
        now: SystemTime,
    ) -> Result<LogOptions, String> {
        let mut o = LogOptions::default();
        let (mut since_seconds, mut since_time) = (None, None);
        for (k, v) in pairs {
            match k {
                "follow" => o.follow = boolean(k, v)?,
                "previous" => o.previous = boolean(k, v)?,
                "timestamps" => o.timestamps = boolean(k, v)?,
                "tailLines" => o.tail_lines = Some(natural(k, v, 0)? as u64),
                "limitBytes" => o.limit_bytes = Some(natural(k, v, 1)? as u64),
                "sinceSeconds" => since_seconds = Some(natural(k, v, 1)? as u64),
                "sinceTime" => {
                    let t: k8s_openapi::jiff::Timestamp =
                        v.parse().map_err(|_| format!("sinceTime: {v:?} is not an RFC 3339 time"))?;
                    since_time = Some(SystemTime::from(t));
                }
                "stream" => {
                    o.streams = match v {
                        "All" | "" => Streams::All,
                        "Stdout" => Streams::Stdout,
                        "Stderr" => Streams::Stderr,
                        _ => return Err(format!("stream: {v:?} is not one of All, Stdout, Stderr")),
                    }
                }
                // Unknown parameters are ignored, as the kubelet's decoder does.
                _ => {}
            }
        }
        if since_seconds.is_some() && since_time.is_some() {
            return Err("at most one of sinceTime or sinceSeconds may be specified".into());
        }
        o.since = since_time.or(since_seconds.map(|s| now - Duration::from_secs(s)));
        Ok(o)
    }

    fn wants(&self, stream: &str) -> bool {
        match self.streams {
            Streams::All => true,
            Streams::Stdout => stream == "stdout",
            Streams::Stderr => stream == "stderr",
        }
    }
}

/// Where the last `n` records of `content` start (the kubelet counts the file's lines, one
/// per record, partial or not).
pub fn tail_start(content: &[u8], n: u64) -> usize {
    if n == 0 {
        return content.len();
    }
    // A last record without its newline (being written) counts as a line.
    let body = content.strip_suffix(b"\n").unwrap_or(content);
    let mut seen = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == n {
                return i + 1;
            }
        }
    }
    0
}

/// What the options select from a CRI log file's `content`, as the kubelet writes it out:
/// each record's text, a full record ending its line, with its time in front when asked;
/// at most limitBytes. Records that do not parse are skipped (and counted in the result).
pub fn select(content: &[u8], o: &LogOptions) -> (Vec<u8>, usize) {
    let start = o.tail_lines.map_or(0, |n| tail_start(content, n));
    let mut out = Vec::new();
    let mut skipped = 0;
    let limit = o.limit_bytes.map_or(usize::MAX, |l| l as usize);
    for line in content[start..].split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let r = match parse_record(line) {
            Ok(r) => r,
            Err(_) => {
                skipped += 1;
                continue;
            }
        };
        if !o.wants(r.stream) || o.since.is_some_and(|s| r.time < s) {
            continue;
        }
        if o.timestamps {
            out.extend_from_slice(r.time_text.as_bytes());
            out.push(b' ');
        }
        out.extend_from_slice(r.text);
        if !r.partial {
            out.push(b'\n');
        }
        if out.len() >= limit {
            out.truncate(limit);
            break;
        }
    }
    (out, skipped)
}

/// What the options select of a log read piece by piece as it grows (`kubectl logs -f`):
/// whole records only (a writer may be half-way through the last one), tailLines taken from
/// the first piece alone, limitBytes counted across all of them.
pub struct Selector {
    opts: LogOptions,
    pending: Vec<u8>,
    sent: u64,
    limit: u64,
}

impl Selector {
    pub fn new(o: &LogOptions) -> Selector {
        Selector { opts: o.clone(), pending: Vec::new(), sent: 0, limit: o.limit_bytes.unwrap_or(u64::MAX) }
    }

    /// What the next piece read from the file adds to the output.
    pub fn feed(&mut self, piece: &[u8]) -> Vec<u8> {
        self.pending.extend_from_slice(piece);
        let mut out = Vec::new();
        if let Some(end) = self.pending.iter().rposition(|b| *b == b'\n') {
            let whole: Vec<u8> = self.pending.drain(..=end).collect();
            let opts = LogOptions { limit_bytes: Some(self.limit - self.sent), ..self.opts.clone() };
            out = select(&whole, &opts).0;
            self.sent += out.len() as u64;
        }
        // Only the first piece is tailed; the rest is what comes after it.
        self.opts.tail_lines = None;
        out
    }

    /// limitBytes is used up: nothing more will come out.
    pub fn full(&self) -> bool {
        self.sent >= self.limit
    }

    /// Drops a record begun and not finished (the file it was in is left for another).
    pub fn drop_partial(&mut self) {
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &[u8] = b"2026-12-01T10:00:00.000000001Z stdout F one\n\
2026-12-01T10:00:01Z stderr F two\n\
2026-12-01T10:00:02.5Z stdout P thr\n\
2026-12-01T10:00:02.6Z stdout F ee\n\
not a record\n\
2026-12-01T10:00:03+00:00 stdout F four\n";

    fn at(s: &str) -> SystemTime {
        SystemTime::from(s.parse::<k8s_openapi::jiff::Timestamp>().unwrap())
    }

    #[test]
    fn records_parse_and_bad_ones_are_named() {
        let r = parse_record(b"2026-12-01T10:00:02.5Z stdout P thr").unwrap();
        assert_eq!((r.stream, r.partial, r.text), ("stdout", true, &b"thr"[..]));
        assert_eq!(r.time, at("2026-12-01T10:00:02.5Z"));
        assert_eq!(parse_record(b"2026-12-01T10:00:00Z stdout F").unwrap().text, b"", "an empty line");
        assert!(parse_record(b"2026-12-01T10:00:00Z stdout F:x a b").is_ok(), "tags with flags");
        for bad in [
            &b"nonsense"[..],
            b"2026-12-01T10:00:00Z stdin F x",
            b"2026-12-01T10:00:00Z stdout X x",
            b"yesterday stdout F x",
        ] {
            let e = parse_record(bad).unwrap_err();
            assert!(e.starts_with("invalid CRI log record"), "{e}");
        }
    }

    #[test]
    fn the_whole_log_joins_partial_records() {
        let (out, skipped) = select(LOG, &LogOptions::default());
        assert_eq!(String::from_utf8(out).unwrap(), "one\ntwo\nthree\nfour\n");
        assert_eq!(skipped, 1);
    }

    #[test]
    fn tail_since_streams_timestamps_and_limit() {
        let tail = |n| LogOptions { tail_lines: Some(n), ..Default::default() };
        assert_eq!(select(LOG, &tail(1)).0, b"four\n");
        assert_eq!(select(LOG, &tail(3)).0, b"ee\nfour\n", "records count as lines, as the kubelet counts");
        assert_eq!(select(LOG, &tail(0)).0, b"");
        assert_eq!(select(LOG, &tail(100)).0, select(LOG, &LogOptions::default()).0);
        assert_eq!(tail_start(b"a\nb", 1), 2, "a last record still being written counts");
        let since = LogOptions { since: Some(at("2026-12-01T10:00:01Z")), ..Default::default() };
        assert_eq!(select(LOG, &since).0, b"two\nthree\nfour\n");
        let stderr = LogOptions { streams: Streams::Stderr, ..Default::default() };
        assert_eq!(select(LOG, &stderr).0, b"two\n");
        let stamped = LogOptions { timestamps: true, tail_lines: Some(1), ..Default::default() };
        assert_eq!(select(LOG, &stamped).0, b"2026-12-01T10:00:03+00:00 four\n");
        let limited = LogOptions { limit_bytes: Some(6), ..Default::default() };
        assert_eq!(select(LOG, &limited).0, b"one\ntw");
    }

    #[test]
    fn query_options_are_read_and_checked_as_the_api_server_does() {
        let now = at("2026-12-01T10:00:10Z");
        let o = LogOptions::from_query(
            [("follow", "true"), ("tailLines", "5"), ("timestamps", "1"), ("limitBytes", "100"), ("sinceSeconds", "4")],
            now,
        )
        .unwrap();
        assert!(o.follow && o.timestamps && !o.previous);
        assert_eq!((o.tail_lines, o.limit_bytes, o.since), (Some(5), Some(100), Some(at("2026-12-01T10:00:06Z"))));
        let o = LogOptions::from_query([("sinceTime", "2026-12-01T09:00:00Z"), ("stream", "Stdout")], now).unwrap();
        assert_eq!((o.since, o.streams), (Some(at("2026-12-01T09:00:00Z")), Streams::Stdout));
        for (pairs, want) in [
            (vec![("tailLines", "-1")], "tailLines: must be greater than or equal to 0"),
            (vec![("limitBytes", "0")], "limitBytes: must be greater than or equal to 1"),
            (vec![("sinceSeconds", "0")], "sinceSeconds: must be greater than or equal to 1"),
            (vec![("sinceSeconds", "1"), ("sinceTime", "2026-12-01T09:00:00Z")], "at most one of sinceTime"),
            (vec![("sinceTime", "noon")], "sinceTime: \"noon\" is not an RFC 3339 time"),
            (vec![("follow", "maybe")], "follow: \"maybe\" is not a boolean"),
            (vec![("stream", "Both")], "stream: \"Both\" is not one of"),
        ] {
            let e = LogOptions::from_query(pairs.clone(), now).unwrap_err();
            assert!(e.starts_with(want), "{pairs:?}: {e}");
        }
    }

    #[test]
    fn a_selector_follows_a_growing_log() {
        let o = LogOptions { tail_lines: Some(1), limit_bytes: Some(12), ..Default::default() };
        let mut s = Selector::new(&o);
        // The first piece is tailed; a record cut short waits for its end.
        let first =
            s.feed(b"2026-12-01T10:00:00Z stdout F one\n2026-12-01T10:00:01Z stdout F two\n2026-12-01T10:00:02Z std");
        assert_eq!(first, b"two\n");
        // Later pieces are not tailed; limitBytes counts across them.
        assert_eq!(s.feed(b"out F three\n2026-12-01T10:00:03Z stdout F four\n"), b"three\nfo", "12 bytes in all");
        assert!(s.full());
        assert!(s.feed(b"2026-12-01T10:00:04Z stdout F five\n").is_empty());
        let mut s = Selector::new(&LogOptions::default());
        assert!(s.feed(b"2026-12-01T10:00:00Z stdout F half").is_empty());
        s.drop_partial();
        assert_eq!(s.feed(b"2026-12-01T10:00:05Z stdout F next\n"), b"next\n");
        assert!(!s.full());
    }
}
