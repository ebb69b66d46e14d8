//! Files for plain HTTP requests. A group with `static_dir` answers a `GET` or `HEAD` that is
//! not a WebSocket upgrade with a file from that folder (`index.html` for `/`), so a browser
//! pointed at the WebSocket's own address gets a page — the demo chat room — that then
//! connects back to the same port. A group without it refuses such requests (426, or 405 for
//! `HEAD`).
//!
//! Deliberately small: one request per connection (`Connection: close`), no ranges, no
//! directory listings, no dotfiles. The path is percent-decoded, `..` and hidden names are
//! refused, and the result is canonicalized and must still lie inside the folder, so neither
//! an escape in the URL nor a symlink pointing out of the folder reaches other files.
//!
//! The file is read with a blocking `std::fs::read` on the worker's thread: fine for a few
//! small demo files from the page cache, wrong for big files or slow disks (put a web server
//! in front for those). Files over [`MAX_FILE_BYTES`] are not served at all. Nothing is kept
//! after the response: the body is queued by reference and freed as it is written.

use super::event_loop::Loop;
use crate::proto::handshake::{FileRequest, Reject};
use bytes::Bytes;
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Larger files get a 404 instead of being read into memory.
pub(crate) const MAX_FILE_BYTES: u64 = 16 << 20;

impl Loop {
    /// Answers a plain `GET`/`HEAD`: a file from `static_dir`, or the 426 refusal without one.
    pub(super) fn serve_file(&mut self, idx: usize, request: FileRequest) {
        let (status, response) = match &self.settings.static_dir {
            Some(dir) => respond(dir, &request),
            None => {
                let r = request.refusal();
                // Not a file server: the request is a refused upgrade, and counted as one.
                let id = self.ctx.conns[idx].id;
                self.handshake_ended(id, Some(r.status));
                (r.status, r.response())
            }
        };
        let conn = &mut self.ctx.conns[idx];
        let method = if request.head { "HEAD" } else { "GET" };
        log::debug!(
            "{method} {} from {}: {status}",
            crate::escaped(&request.path),
            conn.remote
        );
        conn.session.respond(&response);
        self.ctx.mark_dirty(idx);
    }
}

/// The whole HTTP response to `request` for files under `dir`, and its status.
pub(crate) fn respond(dir: &Path, request: &FileRequest) -> (u16, Bytes) {
    let found = resolve(dir, &request.path).and_then(|(file, name)| {
        let body = if request.head {
            Body::Length(size(&file)?)
        } else {
            Body::Bytes(read(&file)?)
        };
        Ok((content_type(&name), body))
    });
    let (kind, body) = match found {
        Ok(found) => found,
        Err(r) => return (r.status, r.response()),
    };
    let len = match &body {
        Body::Length(n) => *n as usize,
        Body::Bytes(b) => b.len(),
    };
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {len}\r\n\
         Cache-Control: no-cache\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    if let Body::Bytes(b) = body {
        out.extend_from_slice(&b);
    }
    (200, out.into())
}

enum Body {
    /// `HEAD`: only the size.
    Length(u64),
    Bytes(Vec<u8>),
}

const fn refuse(status: u16, why: &'static str) -> Reject {
    Reject::fixed(status, why)
}

const NOT_FOUND: Reject = refuse(404, "no such file");

/// The file a request target names under `dir`: its canonical path, and the name asked for
/// (whose extension gives the content type, even where the file is a symlink).
///
/// `/` and any path ending in `/` mean that folder's `index.html`. The query is ignored.
/// Escapes are decoded first, so `%2e%2e` is `..` and `%2f` a separator. Refused: a target not
/// starting with `/`, a malformed escape or a NUL (400); `..` or any name starting with `.`,
/// and anything whose canonical path is outside `dir` (404, as if it did not exist).
pub(crate) fn resolve(dir: &Path, target: &str) -> Result<(PathBuf, PathBuf), Reject> {
    let path = target.split(['?', '#']).next().unwrap_or_default();
    if !path.starts_with('/') {
        return Err(refuse(400, "the path must start with /"));
    }
    let decoded = percent_decode(path.as_bytes()).ok_or(refuse(400, "malformed %-escape"))?;
    if decoded.contains(&0) {
        return Err(refuse(400, "NUL in the path"));
    }
    let mut name = PathBuf::new();
    for segment in decoded.split(|&b| b == b'/') {
        match segment {
            b"" | b"." => {}
            s if s.starts_with(b".") => return Err(NOT_FOUND),
            s => name.push(OsStr::from_bytes(s)),
        }
    }
    if name.as_os_str().is_empty() || decoded.ends_with(b"/") {
        name.push("index.html");
    }
    let root = dir.canonicalize().map_err(|_| NOT_FOUND)?;
    let file = root.join(&name).canonicalize().map_err(|_| NOT_FOUND)?;
    if !file.starts_with(&root) {
        return Err(NOT_FOUND);
    }
    Ok((file, name))
}

/// `%XX` escapes decoded to bytes; `None` for a `%` not followed by two hex digits.
fn percent_decode(s: &[u8]) -> Option<Vec<u8>> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            let hi = hex(*s.get(i + 1)?)?;
            let lo = hex(*s.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    Some(out)
}

/// The size of a regular file no larger than [`MAX_FILE_BYTES`].
fn size(file: &Path) -> Result<u64, Reject> {
    // Checked before opening: opening a FIFO would block the worker.
    let meta = std::fs::metadata(file).map_err(|_| NOT_FOUND)?;
    if !meta.is_file() {
        return Err(NOT_FOUND);
    }
    if meta.len() > MAX_FILE_BYTES {
        log::warn!(
            "not serving {}: {} bytes is over the {MAX_FILE_BYTES}-byte cap",
            crate::escaped(file.as_os_str().as_bytes()),
            meta.len()
        );
        return Err(refuse(404, "file too large to serve"));
    }
    Ok(meta.len())
}

/// A regular file's bytes (blocking; see the module's notes).
fn read(file: &Path) -> Result<Vec<u8>, Reject> {
    let len = size(file)?;
    let mut body = Vec::with_capacity(len as usize);
    std::fs::File::open(file)
        .and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_end(&mut body))
        .map_err(|_| NOT_FOUND)?;
    if body.len() as u64 > MAX_FILE_BYTES {
        return Err(refuse(404, "file too large to serve")); // It grew since.
    }
    Ok(body)
}

/// The `Content-Type` for a file name, by its extension.
pub(crate) fn content_type(name: &Path) -> &'static str {
    let ext = name
        .extension()
        .and_then(OsStr::to_str)
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json") => "application/json",
        Some("txt") => "text/plain; charset=utf-8",
        Some("png") => "image/png",
        Some("svg") => "image/svg+xml",
        Some("ico") => "image/x-icon",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// `root/site/{index.html, app.js, sub/index.html, .secret}`, `root/outside.txt`, and
    /// symlinks in `site`: `out` → `../outside.txt`, `in.txt` → `app.js`.
    fn site() -> (tempfile::TempDir, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let site = root.path().join("site");
        fs::create_dir_all(site.join("sub")).unwrap();
        fs::write(site.join("index.html"), "<h1>hi</h1>").unwrap();
        fs::write(site.join("app.js"), "x()").unwrap();
        fs::write(site.join("a b.txt"), "spaced").unwrap();
        fs::write(site.join("sub/index.html"), "sub").unwrap();
        fs::write(site.join(".secret"), "s").unwrap();
        fs::write(root.path().join("outside.txt"), "secret").unwrap();
        std::os::unix::fs::symlink("../outside.txt", site.join("out")).unwrap();
        std::os::unix::fs::symlink("app.js", site.join("in.txt")).unwrap();
        (root, site)
    }

    fn status(dir: &Path, target: &str) -> u16 {
        let req = FileRequest {
            head: true,
            path: target.into(),
        };
        respond(dir, &req).0
    }

    #[test]
    fn paths_resolve_inside_the_folder_only() {
        let (_root, site) = site();
        let name = |t: &str| resolve(&site, t).unwrap().1;
        assert_eq!(name("/"), Path::new("index.html"));
        assert_eq!(name("/?room=1"), Path::new("index.html"));
        assert_eq!(name("/sub/"), Path::new("sub/index.html"));
        assert_eq!(name("//app.js#x"), Path::new("app.js"));
        assert_eq!(name("/./app.js"), Path::new("app.js"));
        assert_eq!(name("/a%20b.txt"), Path::new("a b.txt"));
        assert_eq!(name("/sub%2Findex.html"), Path::new("sub/index.html"));
        let (file, name) = resolve(&site, "/in.txt").unwrap();
        assert_eq!(file, site.canonicalize().unwrap().join("app.js"));
        assert_eq!(
            content_type(&name),
            "text/plain; charset=utf-8",
            "by the name asked"
        );

        for escape in [
            "/../outside.txt",
            "/sub/../../outside.txt",
            "/%2e%2e/outside.txt",
            "/%2E%2E%2Foutside.txt",
            "/..%2foutside.txt",
            "/out",          // a symlink out of the folder
            "/.secret",      // dotfiles are not served
            "/missing.html", // nor what is not there
            "/sub",          // a folder is not a file (and has no index without the slash)
        ] {
            assert_eq!(status(&site, escape), 404, "{escape}");
        }
        for bad in [
            "/a%00b",
            "/%",
            "/%2",
            "/%zz",
            "app.js",
            "http://h/app.js",
            "",
        ] {
            assert_eq!(status(&site, bad), 400, "{bad}");
        }
    }

    #[test]
    fn responses_carry_type_length_and_close() {
        let (_root, site) = site();
        let get = |path: &str, head: bool| {
            let (status, out) = respond(
                &site,
                &FileRequest {
                    head,
                    path: path.into(),
                },
            );
            (status, String::from_utf8(out.to_vec()).unwrap())
        };
        let (status, text) = get("/", false);
        assert_eq!(status, 200);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(text.contains("\r\nContent-Type: text/html; charset=utf-8\r\n"));
        assert!(text.contains("\r\nContent-Length: 11\r\n"));
        assert!(text.contains("\r\nConnection: close\r\n"));
        assert!(text.ends_with("\r\n\r\n<h1>hi</h1>"));
        let (_, text) = get("/app.js", true);
        assert!(text.contains("\r\nContent-Length: 3\r\n") && text.ends_with("\r\n\r\n"));
        let (status, text) = get("/../outside.txt", false);
        assert_eq!(status, 404);
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n") && !text.contains("secret"));
        assert_eq!(get("/a%00", false).0, 400);
    }

    #[test]
    fn files_over_the_cap_are_not_read() {
        let (_root, site) = site();
        let big = fs::File::create(site.join("big.png")).unwrap();
        big.set_len(MAX_FILE_BYTES + 1).unwrap(); // sparse: no real 16 MiB written
        let req = FileRequest {
            head: false,
            path: "/big.png".into(),
        };
        assert_eq!(respond(&site, &req).0, 404);
        big.set_len(MAX_FILE_BYTES).unwrap();
        assert_eq!(respond(&site, &req).0, 200);
    }

    #[test]
    fn content_types_by_extension() {
        for (name, kind) in [
            ("a.html", "text/html; charset=utf-8"),
            ("A.HTM", "text/html; charset=utf-8"),
            ("a.js", "text/javascript; charset=utf-8"),
            ("a.css", "text/css; charset=utf-8"),
            ("a.png", "image/png"),
            ("a.svg", "image/svg+xml"),
            ("favicon.ico", "image/x-icon"),
            ("a.json", "application/json"),
            ("a.txt", "text/plain; charset=utf-8"),
            ("a.wasm", "application/octet-stream"),
            ("Makefile", "application/octet-stream"),
        ] {
            assert_eq!(content_type(Path::new(name)), kind, "{name}");
        }
    }
}
