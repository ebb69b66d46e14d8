//! Lines out of a byte stream (a handler's stdout or stderr), with a bound: a line longer than
//! `max` is skipped as it streams past, never held whole, so a handler that prints 10 MiB
//! without a newline costs its reader `max` bytes at most.

/// What [`Lines::feed`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// A whole line, without its newline (or its `\r`).
    Line(&'a [u8]),
    /// A line of this many bytes, over the bound, skipped.
    TooLong(usize),
}

/// A partial line between reads.
pub struct Lines {
    buf: Vec<u8>,
    max: usize,
    /// Inside an over-long line: the bytes skipped so far.
    skipping: Option<usize>,
}

impl Lines {
    pub fn new(max: usize) -> Lines {
        Lines {
            buf: Vec::new(),
            max,
            skipping: None,
        }
    }

    /// Takes `data`, handing each line it completes to `out`.
    pub fn feed(&mut self, mut data: &[u8], mut out: impl FnMut(Piece<'_>)) {
        while let Some(nl) = memchr::memchr(b'\n', data) {
            let (head, rest) = (&data[..nl], &data[nl + 1..]);
            data = rest;
            if let Some(skipped) = self.skipping.take() {
                out(Piece::TooLong(skipped + head.len()));
                continue;
            }
            if self.buf.len() + head.len() > self.max {
                out(Piece::TooLong(self.buf.len() + head.len()));
                self.buf.clear();
                continue;
            }
            let line = if self.buf.is_empty() {
                head
            } else {
                self.buf.extend_from_slice(head);
                &self.buf[..]
            };
            out(Piece::Line(line.strip_suffix(b"\r").unwrap_or(line)));
            self.buf.clear();
        }
        match &mut self.skipping {
            Some(skipped) => *skipped += data.len(),
            None if self.buf.len() + data.len() > self.max => {
                self.skipping = Some(self.buf.len() + data.len());
                self.buf = Vec::new();
            }
            None => self.buf.extend_from_slice(data),
        }
        if self.buf.is_empty() && self.buf.capacity() > 64 << 10 {
            self.buf = Vec::new();
        }
    }

    /// Forgets a partial line (the stream's writer is gone).
    pub fn reset(&mut self) {
        self.buf = Vec::new();
        self.skipping = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(lines: &mut Lines, data: &[u8]) -> Vec<String> {
        let mut got = Vec::new();
        lines.feed(data, |p| {
            got.push(match p {
                Piece::Line(l) => String::from_utf8_lossy(l).into_owned(),
                Piece::TooLong(n) => format!("<{n}>"),
            })
        });
        got
    }

    #[test]
    fn lines_split_across_reads_and_long_ones_are_skipped() {
        let mut l = Lines::new(8);
        assert_eq!(pieces(&mut l, b"ab\ncd"), vec!["ab"]);
        assert_eq!(pieces(&mut l, b"e\r\n\n"), vec!["cde", ""]);
        assert_eq!(pieces(&mut l, b"0123456789"), Vec::<String>::new());
        assert_eq!(pieces(&mut l, b"0123456789"), Vec::<String>::new());
        assert_eq!(pieces(&mut l, b"01\nok\n"), vec!["<22>", "ok"]);
        assert_eq!(
            pieces(&mut l, b"12345\n678901234\nx\n"),
            vec!["12345", "<9>", "x"]
        );
        assert!(l.buf.capacity() <= 64 << 10);
    }
}
