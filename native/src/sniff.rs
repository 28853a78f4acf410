//! Media-type detection: magic bytes first, the file name's extension second.

pub const PLAIN: &str = "text/plain";
pub const MARKDOWN: &str = "text/markdown";
pub const HTML: &str = "text/html";
pub const PDF: &str = "application/pdf";
pub const DOCX: &str = "application/vnd.openxmlformats-officedocument.wordprocessingml.document";
pub const PNG: &str = "image/png";
pub const JPEG: &str = "image/jpeg";
pub const GIF: &str = "image/gif";
pub const WEBP: &str = "image/webp";
pub const WAV: &str = "audio/wav";
pub const FLAC: &str = "audio/flac";
pub const MP3: &str = "audio/mpeg";
pub const OGG: &str = "audio/ogg";
pub const M4A: &str = "audio/mp4";
pub const ZIP: &str = "application/zip";
pub const OCTET_STREAM: &str = "application/octet-stream";
/// OLE compound file: legacy Office formats, and password-protected OOXML.
pub const CFB: &str = "application/x-cfb";

/// The audio types [`crate::extract::extract`] decodes.
pub const AUDIO: [&str; 5] = [WAV, FLAC, MP3, OGG, M4A];

/// The media types [`crate::extract::extract`] understands.
pub const SUPPORTED: [&str; 14] = [
    PLAIN, MARKDOWN, HTML, PDF, DOCX, PNG, JPEG, GIF, WEBP, WAV, FLAC, MP3, OGG, M4A,
];

/// A caller-declared type reduced to its canonical essence, aliases folded in.
/// Returns the essence and the `charset` parameter, if any.
pub fn normalize(declared: &str) -> (String, Option<String>) {
    let mut parts = declared.split(';');
    let essence = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    let charset = parts.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("charset")
            .then(|| v.trim().trim_matches('"').to_string())
    });
    let essence = match essence.as_str() {
        "text/x-markdown" | "text/md" => MARKDOWN.to_string(),
        "application/xhtml+xml" => HTML.to_string(),
        "image/jpg" => JPEG.to_string(),
        "application/x-pdf" => PDF.to_string(),
        "audio/x-wav" | "audio/wave" | "audio/vnd.wave" => WAV.to_string(),
        "audio/x-flac" => FLAC.to_string(),
        "audio/mp3" | "audio/x-mp3" | "audio/mpeg3" => MP3.to_string(),
        "audio/vorbis" | "application/ogg" => OGG.to_string(),
        "audio/x-m4a" | "audio/m4a" | "audio/aac" => M4A.to_string(),
        _ => essence,
    };
    (essence, charset)
}

/// Detects the media type of `data`, using `filename` where the bytes do not decide.
pub fn sniff(data: &[u8], filename: Option<&str>) -> &'static str {
    if let Some(kind) = by_magic(data) {
        return kind;
    }
    let ext = filename
        .and_then(|f| f.rsplit_once('.'))
        .map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("md" | "markdown" | "mdown" | "mkd") => return MARKDOWN,
        Some("html" | "htm" | "xhtml") => return HTML,
        Some("txt" | "text" | "log" | "csv" | "tsv" | "rst") => return PLAIN,
        Some("mp3") => return MP3,
        _ => {}
    }
    if looks_like_html(data) {
        HTML
    } else if looks_like_text(data) {
        PLAIN
    } else {
        OCTET_STREAM
    }
}

fn by_magic(data: &[u8]) -> Option<&'static str> {
    let head = &data[..data.len().min(1024)];
    if data.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(PNG)
    } else if data.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(JPEG)
    } else if data.starts_with(b"GIF87a") || data.starts_with(b"GIF89a") {
        Some(GIF)
    } else if data.len() >= 12 && &data[..4] == b"RIFF" && &data[8..12] == b"WEBP" {
        Some(WEBP)
    } else if data.len() >= 12 && &data[..4] == b"RIFF" && &data[8..12] == b"WAVE" {
        Some(WAV)
    } else if data.starts_with(b"fLaC") {
        Some(FLAC)
    } else if data.starts_with(b"OggS") {
        Some(OGG)
    } else if data.len() >= 12 && &data[4..8] == b"ftyp" && is_audio_brand(&data[8..12]) {
        Some(M4A)
    } else if data.starts_with(b"ID3") || is_mpeg_audio_frame(data) {
        Some(MP3)
    } else if find(head, b"%PDF-").is_some() {
        // The spec allows junk before the header; readers accept it within 1 KiB.
        Some(PDF)
    } else if data.starts_with(&[0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1]) {
        Some(CFB)
    } else if data.starts_with(b"PK\x03\x04") {
        // A DOCX names its main part in the central directory; any other zip is not ours.
        Some(if find(data, b"word/document.xml").is_some() {
            DOCX
        } else {
            ZIP
        })
    } else {
        None
    }
}

/// MP4 brands of audio files (and general-purpose ones, whose audio track is used).
fn is_audio_brand(brand: &[u8]) -> bool {
    matches!(
        brand,
        b"M4A " | b"M4B " | b"M4P " | b"mp41" | b"mp42" | b"isom" | b"iso2" | b"dash"
    )
}

/// An MPEG Layer III frame header: 11 sync bits, a valid version, bit rate and sample
/// rate (MP3 files without an ID3 tag start with one). Layer I is left out: its
/// header can be `FF FE`, a UTF-16 byte-order mark.
fn is_mpeg_audio_frame(data: &[u8]) -> bool {
    if data.len() < 4 || data[0] != 0xFF || data[1] & 0xE0 != 0xE0 {
        return false;
    }
    let version = (data[1] >> 3) & 0b11;
    let layer = (data[1] >> 1) & 0b11;
    let bitrate = data[2] >> 4;
    let rate = (data[2] >> 2) & 0b11;
    version != 0b01 && layer == 0b01 && bitrate != 0 && bitrate != 0xF && rate != 0b11
}

fn looks_like_html(data: &[u8]) -> bool {
    let head = &data[..data.len().min(1024)];
    let lower = head.to_ascii_lowercase();
    let trimmed = lower.trim_ascii_start();
    let trimmed = trimmed
        .strip_prefix(b"\xef\xbb\xbf".as_slice())
        .unwrap_or(trimmed);
    trimmed.starts_with(b"<!doctype html")
        || trimmed.starts_with(b"<html")
        || find(&lower, b"<html").is_some()
        || find(&lower, b"<body").is_some()
}

/// Text unless it has NUL bytes that a UTF-16 byte-order mark does not explain.
fn looks_like_text(data: &[u8]) -> bool {
    if data.starts_with(&[0xFF, 0xFE]) || data.starts_with(&[0xFE, 0xFF]) {
        return true;
    }
    !data[..data.len().min(8192)].contains(&0)
}

pub(crate) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_beats_extension() {
        assert_eq!(sniff(b"%PDF-1.7\n", Some("x.txt")), PDF);
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\nrest", Some("x.md")), PNG);
    }

    #[test]
    fn extension_then_content() {
        assert_eq!(sniff(b"# Title", Some("README.md")), MARKDOWN);
        assert_eq!(sniff(b"  <!DOCTYPE html><p>x", None), HTML);
        assert_eq!(sniff(b"hello", None), PLAIN);
        assert_eq!(sniff(b"\x00\x01\x02binary", None), OCTET_STREAM);
    }

    #[test]
    fn audio_by_magic_and_a_utf16_bom_is_not_an_mp3_frame() {
        assert_eq!(sniff(b"RIFF\x24\0\0\0WAVEfmt ", None), WAV);
        assert_eq!(sniff(b"fLaC\0\0\0\x22", None), FLAC);
        assert_eq!(sniff(b"OggS\0\x02", None), OGG);
        assert_eq!(sniff(b"\0\0\0\x20ftypM4A \0\0\0\0", None), M4A);
        assert_eq!(sniff(b"ID3\x04\0\0", None), MP3);
        assert_eq!(sniff(&[0xFF, 0xFB, 0x90, 0x64, 0, 0], None), MP3);
        assert_eq!(sniff(&[0xFF, 0xFE, b'h', 0, b'i', 0], None), PLAIN);
    }

    #[test]
    fn normalizes_declared_types() {
        assert_eq!(
            normalize("Text/HTML; charset=\"UTF-8\""),
            (HTML.into(), Some("UTF-8".into()))
        );
        assert_eq!(normalize("image/jpg").0, JPEG);
    }
}
