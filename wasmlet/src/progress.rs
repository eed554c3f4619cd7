//! Progress lines for `wasmlet image pull` and `push`, on stderr: one when a blob starts, at
//! most one every 200 ms while it moves, one when it is done. On a terminal the running line is
//! rewritten in place instead.

use std::io::{IsTerminal, Write};
use std::sync::Arc;

use wasmlet_images::{Observer, Progress};

/// `1.5 MiB` and the like.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// One line for a report; `verb` is what a finished blob had done to it (`downloaded`).
pub fn line(p: &Progress<'_>, verb: &str) -> String {
    let short = p.digest.get(..19).unwrap_or(p.digest);
    let total = p.total.map(human).unwrap_or_else(|| "?".into());
    match (p.finished, p.skipped) {
        (true, true) => format!("{:<7} {short}  already present ({total})", p.what),
        (true, false) => format!("{:<7} {short}  {verb} {}", p.what, human(p.done)),
        _ => {
            let pct = p.total.filter(|t| *t > 0).map(|t| format!(" {:>3}%", p.done * 100 / t)).unwrap_or_default();
            format!("{:<7} {short}  {} / {total}{pct}", p.what, human(p.done))
        }
    }
}

/// An observer that prints [`line`]s to stderr.
pub fn observer(verb: &'static str) -> Observer {
    let tty = std::io::stderr().is_terminal();
    Arc::new(move |p| {
        let mut err = std::io::stderr().lock();
        let text = line(&p, verb);
        let _ = if tty && !p.finished {
            write!(err, "\r{text}\x1b[K")
        } else if tty {
            writeln!(err, "\r{text}\x1b[K")
        } else {
            writeln!(err, "{text}")
        };
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(done: u64, total: Option<u64>, finished: bool, skipped: bool) -> Progress<'static> {
        Progress { what: "wasm", digest: "sha256:0123456789abcdef0123", done, total, finished, skipped }
    }

    #[test]
    fn lines_say_how_far() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 << 20), "3.0 MiB");
        assert_eq!(
            line(&p(0, Some(2048), false, false), "downloaded"),
            "wasm    sha256:0123456789ab  0 B / 2.0 KiB   0%"
        );
        assert_eq!(
            line(&p(1024, Some(2048), false, false), "downloaded"),
            "wasm    sha256:0123456789ab  1.0 KiB / 2.0 KiB  50%"
        );
        assert_eq!(
            line(&p(2048, Some(2048), true, false), "uploaded"),
            "wasm    sha256:0123456789ab  uploaded 2.0 KiB"
        );
        assert_eq!(
            line(&p(2048, Some(2048), true, true), "downloaded"),
            "wasm    sha256:0123456789ab  already present (2.0 KiB)"
        );
        assert_eq!(line(&p(10, None, false, false), "downloaded"), "wasm    sha256:0123456789ab  10 B / ?");
    }
}
