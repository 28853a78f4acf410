//! Runs each candidate PDF text extractor on every file of a corpus, each file in
//! its own child process with a timeout, and prints one JSON object: per library the
//! files that gave text, a typed error, a crash (panic or signal) or a hang, and the
//! pages per second over the files that gave text.
//!
//! Usage: pdf-compare DIR [TIMEOUT_SECS]

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LIBRARIES: [&str; 3] = ["pdf_oxide", "pdf-extract", "oxidize-pdf"];

/// Extracts every page; returns (pages, characters) or an error message.
fn run_one(library: &str, data: Vec<u8>) -> Result<(usize, usize), String> {
    match library {
        "pdf_oxide" => {
            let doc = pdf_oxide::PdfDocument::from_bytes(data).map_err(|e| e.to_string())?;
            if doc.is_encrypted() && !doc.authenticate(b"").map_err(|e| e.to_string())? {
                return Err("encrypted".into());
            }
            let pages = doc.page_count().map_err(|e| e.to_string())?;
            let mut chars = 0;
            for i in 0..pages {
                chars += doc.extract_text(i).map_err(|e| e.to_string())?.chars().count();
            }
            Ok((pages, chars))
        }
        "pdf-extract" => {
            let pages = pdf_extract::extract_text_from_mem_by_pages(&data).map_err(|e| e.to_string())?;
            Ok((pages.len(), pages.iter().map(|p| p.chars().count()).sum()))
        }
        "oxidize-pdf" => {
            let reader = oxidize_pdf::parser::PdfReader::new(Cursor::new(data)).map_err(|e| e.to_string())?;
            let doc = oxidize_pdf::parser::PdfDocument::new(reader);
            let pages = doc.extract_text().map_err(|e| e.to_string())?;
            Ok((pages.len(), pages.iter().map(|p| p.text.chars().count()).sum()))
        }
        other => Err(format!("unknown library {other}")),
    }
}

#[derive(Default)]
struct Tally {
    ok: usize,
    typed_error: usize,
    crash: usize,
    hang: usize,
    pages: usize,
    seconds: f64,
    failures: Vec<String>,
}

fn child(library: &str, file: &Path, timeout: Duration) -> (String, Option<(usize, f64)>) {
    let exe = std::env::current_exe().expect("own path");
    let mut proc = Command::new(exe)
        .args(["--one", library])
        .arg(file)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let started = Instant::now();
    loop {
        if let Some(status) = proc.try_wait().expect("wait") {
            let out = std::io::read_to_string(proc.stdout.take().unwrap()).unwrap_or_default();
            return match status.code() {
                Some(0) => {
                    let mut it = out.split_whitespace();
                    let pages = it.next().and_then(|p| p.parse().ok()).unwrap_or(0);
                    let secs = it.next().and_then(|s| s.parse().ok()).unwrap_or(0.0);
                    ("ok".into(), Some((pages, secs)))
                }
                Some(2) => ("typed_error".into(), None),
                _ => ("crash".into(), None),
            };
        }
        if started.elapsed() > timeout {
            let _ = proc.kill();
            let _ = proc.wait();
            return ("hang".into(), None);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--one") {
        let data = std::fs::read(&args[3]).expect("read");
        let started = Instant::now();
        match run_one(&args[2], data) {
            Ok((pages, _chars)) => {
                println!("{pages} {}", started.elapsed().as_secs_f64());
                std::process::exit(0)
            }
            Err(_) => std::process::exit(2),
        }
    }
    let dir = PathBuf::from(args.get(1).expect("usage: pdf-compare DIR [TIMEOUT_SECS]"));
    let timeout = Duration::from_secs(args.get(2).and_then(|t| t.parse().ok()).unwrap_or(10));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("corpus dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("pdf")))
        .collect();
    files.sort();
    let mut report = Vec::new();
    for library in LIBRARIES {
        let mut t = Tally::default();
        for file in &files {
            let (outcome, ok) = child(library, file, timeout);
            match outcome.as_str() {
                "ok" => {
                    t.ok += 1;
                    let (pages, secs) = ok.unwrap();
                    t.pages += pages;
                    t.seconds += secs;
                }
                "typed_error" => t.typed_error += 1,
                "crash" => t.crash += 1,
                _ => t.hang += 1,
            }
            if outcome != "ok" {
                t.failures.push(format!(
                    "\"{}:{}\"",
                    file.file_name().unwrap().to_string_lossy(),
                    outcome
                ));
            }
        }
        report.push(format!(
            "\"{library}\": {{\"files\": {}, \"ok\": {}, \"typed_error\": {}, \"crash\": {}, \"hang\": {}, \
             \"pages\": {}, \"pages_per_s\": {:.1}, \"not_ok\": [{}]}}",
            files.len(),
            t.ok,
            t.typed_error,
            t.crash,
            t.hang,
            t.pages,
            t.pages as f64 / t.seconds.max(1e-9),
            t.failures.join(", ")
        ));
    }
    println!("{{\"corpus\": \"{}\", \"timeout_s\": {}, {}}}", dir.display(), timeout.as_secs(), report.join(", "));
}
