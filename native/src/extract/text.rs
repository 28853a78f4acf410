//! Byte decoding of text formats. Never fails: undecodable bytes fall back to
//! Windows-1252 (a superset of Latin-1's printable range), which maps every byte.

use encoding_rs::{Encoding, UTF_8, WINDOWS_1252};

/// Decodes `data`: a byte-order mark wins, then a declared charset, then UTF-8 when
/// the bytes are valid UTF-8, else Windows-1252. Line endings become `\n`.
pub fn decode(data: &[u8], charset: Option<&str>) -> String {
    let text = if let Some((encoding, bom_len)) = Encoding::for_bom(data) {
        encoding
            .decode_without_bom_handling(&data[bom_len..])
            .0
            .into_owned()
    } else if let Some(encoding) = charset.and_then(|c| Encoding::for_label(c.as_bytes())) {
        encoding.decode_without_bom_handling(data).0.into_owned()
    } else if let Ok(s) = std::str::from_utf8(data) {
        s.to_owned()
    } else {
        WINDOWS_1252
            .decode_without_bom_handling(data)
            .0
            .into_owned()
    };
    normalize_newlines(text)
}

/// Decodes HTML, also honouring a `<meta charset>` declaration in its first KiB.
pub fn decode_html(data: &[u8], charset: Option<&str>) -> String {
    let declared = charset.map(str::to_owned).or_else(|| meta_charset(data));
    match declared
        .as_deref()
        .and_then(|c| Encoding::for_label(c.as_bytes()))
    {
        // Pages often declare UTF-8 and are not; keep the never-fail fallback.
        Some(enc) if enc == UTF_8 => decode(data, None),
        Some(enc) => decode(data, Some(enc.name())),
        None => decode(data, None),
    }
}

fn meta_charset(data: &[u8]) -> Option<String> {
    let head = data[..data.len().min(1024)].to_ascii_lowercase();
    let at = crate::sniff::find(&head, b"charset=")? + b"charset=".len();
    let rest = &head[at..];
    let rest = rest
        .strip_prefix(b"\"")
        .or_else(|| rest.strip_prefix(b"'"))
        .unwrap_or(rest);
    let end = rest
        .iter()
        .position(|b| matches!(b, b'"' | b'\'' | b';' | b'>' | b' ' | b'/'))
        .unwrap_or(rest.len());
    std::str::from_utf8(&rest[..end]).ok().map(str::to_owned)
}

fn normalize_newlines(text: String) -> String {
    if text.contains('\r') {
        text.replace("\r\n", "\n").replace('\r', "\n")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf16_with_bom() {
        let mut bytes = vec![0xFF, 0xFE];
        bytes.extend("héllo".encode_utf16().flat_map(u16::to_le_bytes));
        assert_eq!(decode(&bytes, None), "héllo");
    }

    #[test]
    fn latin1_fallback_never_fails() {
        assert_eq!(decode(b"caf\xe9\r\n", None), "café\n");
    }

    #[test]
    fn meta_charset_is_honoured() {
        assert_eq!(
            decode_html(b"<meta charset=\"iso-8859-1\"><p>\xe9", None),
            "<meta charset=\"iso-8859-1\"><p>é"
        );
    }
}
