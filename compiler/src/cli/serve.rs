//! `iresnetc serve BUNDLE...`: a small static HTTP server on 127.0.0.1 for the browser
//! runtime and its demo (`web/`, compiled into the binary) and the named bundle directories,
//! read-only: `GET /` is the demo, `/iresnetc/*.js` the runtime, `/bundles.json` the list of
//! bundles, `/bundles/NAME/FILE` a file directly inside bundle NAME (its directory's name).
//! Nothing outside those is served: request paths are plain names (no `..`, no `%`, no
//! backslashes), bundle files are looked up by name in a listing made at start, and requests
//! are bounded in size and time. One thread per connection.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Compiled bundle directories (from `iresnetc compile`).
    #[arg(required = true)]
    pub bundles: Vec<PathBuf>,
    /// Port on 127.0.0.1 (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
}

/// The files of `web/` the server hands out, by URL path.
const WEB: &[(&str, &str, &str)] = &[
    ("/", include_str!("../../../web/demo/index.html"), HTML),
    (
        "/demo/index.html",
        include_str!("../../../web/demo/index.html"),
        HTML,
    ),
    (
        "/demo/demo.js",
        include_str!("../../../web/demo/demo.js"),
        JS,
    ),
    (
        "/iresnetc/index.js",
        include_str!("../../../web/iresnetc/index.js"),
        JS,
    ),
    (
        "/iresnetc/bundle.js",
        include_str!("../../../web/iresnetc/bundle.js"),
        JS,
    ),
    (
        "/iresnetc/plan.js",
        include_str!("../../../web/iresnetc/plan.js"),
        JS,
    ),
    (
        "/iresnetc/executor.js",
        include_str!("../../../web/iresnetc/executor.js"),
        JS,
    ),
    (
        "/iresnetc/rng.js",
        include_str!("../../../web/iresnetc/rng.js"),
        JS,
    ),
    (
        "/iresnetc/modes.js",
        include_str!("../../../web/iresnetc/modes.js"),
        JS,
    ),
];
const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";

/// Longest request head (request line and headers) read.
const MAX_REQUEST_BYTES: u64 = 16 * 1024;
/// A client that sends nothing for this long is dropped.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest bundle file served.
const MAX_FILE_BYTES: u64 = 1 << 30;

/// Bundle name -> its files (name -> path), listed once at start.
type Bundles = BTreeMap<String, BTreeMap<String, PathBuf>>;

fn list_bundles(dirs: &[PathBuf]) -> Result<Bundles> {
    let mut bundles = Bundles::new();
    for dir in dirs {
        if !dir.join("plan.json").is_file() {
            bail!(
                "{}: not a bundle directory (no plan.json; make one with `iresnetc compile`)",
                dir.display()
            );
        }
        let name = dir
            .canonicalize()
            .with_context(|| dir.display().to_string())?
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| is_plain_name(n))
            .map(str::to_string)
            .with_context(|| {
                format!(
                    "{}: the directory's name must be letters, digits, '.', '-' or '_'",
                    dir.display()
                )
            })?;
        let mut files = BTreeMap::new();
        for entry in std::fs::read_dir(dir).with_context(|| dir.display().to_string())? {
            let entry = entry.with_context(|| dir.display().to_string())?;
            // Regular files only (a symlink could lead out of the directory).
            if !entry.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            if let Some(f) = entry.file_name().to_str().filter(|f| is_plain_name(f)) {
                files.insert(f.to_string(), entry.path());
            }
        }
        if bundles.insert(name.clone(), files).is_some() {
            bail!(
                "{}: two bundles named {name:?}; give the directories different names",
                dir.display()
            );
        }
    }
    Ok(bundles)
}

fn is_plain_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

pub fn run(a: &ServeArgs) -> Result<()> {
    let bundles = Arc::new(list_bundles(&a.bundles)?);
    let listener = TcpListener::bind(("127.0.0.1", a.port))
        .with_context(|| format!("cannot listen on 127.0.0.1:{}", a.port))?;
    let addr = listener.local_addr()?;
    println!(
        "serving the demo and {} bundle(s) ({}) on http://{addr}/ (Ctrl-C stops)",
        bundles.len(),
        bundles.keys().cloned().collect::<Vec<_>>().join(", ")
    );
    std::io::stdout().flush()?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let bundles = Arc::clone(&bundles);
        std::thread::spawn(move || {
            // A connection's failure concerns that client only.
            let _ = handle(stream, &bundles);
        });
    }
    Ok(())
}

fn handle(mut stream: TcpStream, bundles: &Bundles) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut reader = BufReader::new((&stream).take(MAX_REQUEST_BYTES));
    let mut line = String::new();
    reader.read_line(&mut line)?;
    // The headers are read (within the bound) and ignored.
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            return respond(
                &mut stream,
                400,
                "text/plain",
                b"request head too long",
                false,
            );
        }
        if h == "\r\n" || h == "\n" {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let head = method == "HEAD";
    if method != "GET" && !head {
        return respond(&mut stream, 405, "text/plain", b"GET or HEAD only", false);
    }
    let path = target.split('?').next().unwrap_or("");
    match resolve(path, bundles) {
        Some(Body::Static(text, mime)) => respond(&mut stream, 200, mime, text.as_bytes(), head),
        Some(Body::Json(text)) => {
            respond(&mut stream, 200, "application/json", text.as_bytes(), head)
        }
        Some(Body::File(p)) => match read_file(&p) {
            Ok(bytes) => respond(&mut stream, 200, mime_of(&p), &bytes, head),
            Err(_) => respond(&mut stream, 404, "text/plain", b"not found", head),
        },
        None => respond(&mut stream, 404, "text/plain", b"not found", head),
    }
}

enum Body {
    Static(&'static str, &'static str),
    Json(String),
    File(PathBuf),
}

fn resolve(path: &str, bundles: &Bundles) -> Option<Body> {
    if let Some(&(_, text, mime)) = WEB.iter().find(|(p, _, _)| *p == path) {
        return Some(Body::Static(text, mime));
    }
    if path == "/bundles.json" {
        let names: Vec<&String> = bundles.keys().collect();
        return serde_json::to_string(&names).ok().map(Body::Json);
    }
    let rest = path.strip_prefix("/bundles/")?;
    let (bundle, file) = rest.split_once('/')?;
    if !is_plain_name(bundle) || !is_plain_name(file) {
        return None;
    }
    bundles.get(bundle)?.get(file).cloned().map(Body::File)
}

fn read_file(p: &std::path::Path) -> std::io::Result<Vec<u8>> {
    let f = std::fs::File::open(p)?;
    let mut bytes = Vec::new();
    f.take(MAX_FILE_BYTES).read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn mime_of(p: &std::path::Path) -> &'static str {
    match p.extension().and_then(|e| e.to_str()) {
        Some("json") => "application/json",
        Some("wgsl") | Some("toml") | Some("txt") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

fn respond(
    stream: &mut TcpStream,
    status: u16,
    mime: &str,
    body: &[u8],
    head: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Method Not Allowed",
    };
    write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {mime}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    if !head {
        stream.write_all(body)?;
    }
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundles() -> Bundles {
        let mut files = BTreeMap::new();
        files.insert("plan.json".to_string(), PathBuf::from("b/plan.json"));
        let mut b = Bundles::new();
        b.insert("toy".to_string(), files);
        b
    }

    /// Only listed names resolve: traversal, encoded characters, hidden files, nested paths
    /// and unknown bundles do not.
    #[test]
    fn resolves_only_listed_files() {
        let b = bundles();
        assert!(matches!(
            resolve("/bundles/toy/plan.json", &b),
            Some(Body::File(p)) if p == std::path::Path::new("b/plan.json")
        ));
        for bad in [
            "/bundles/toy/../plan.json",
            "/bundles/../toy/plan.json",
            "/bundles/toy/%2e%2e/x",
            "/bundles/toy/sub/plan.json",
            "/bundles/toy/.hidden",
            "/bundles/other/plan.json",
            "/bundles/toy/weights.safetensors",
            "/etc/passwd",
            "/iresnetc/../Cargo.toml",
        ] {
            assert!(resolve(bad, &b).is_none(), "{bad}");
        }
        assert!(matches!(resolve("/", &b), Some(Body::Static(_, HTML))));
        assert!(matches!(resolve("/bundles.json", &b), Some(Body::Json(j)) if j == "[\"toy\"]"));
    }
}
