//! PDFs under the deprecated AES-256 revision 5 security handler (Acrobat 9).
//!
//! pdf_oxide 0.3 authenticates R5 passwords but then takes the intermediate key,
//! SHA-256(password ‖ key salt), for the file key instead of using it to unwrap `UE`
//! (or `OE`): every string and stream decrypts to noise and the text comes out empty.
//! Its revision 6 handler is right. So for an R5 file that opens with the empty
//! password we derive the real file key here and append an incremental update that
//! describes the same key as revision 6 (new `U`/`UE` for the empty password). The
//! original bytes stay as they are; the update only shadows the encryption dictionary.

use pdf_oxide::crypto::{active, AesKeySize, Padding};
use pdf_oxide::object::{Object, ObjectRef};
use pdf_oxide::PdfDocument;
use sha2::{Digest, Sha256, Sha384, Sha512};
use std::collections::HashMap;
use std::fmt::Write as _;

use crate::error::{ExtractError, Reason};

/// The file rewritten as revision 6 if it is an R5 file, `None` for any other.
/// An R5 file that the empty password does not open is `Encrypted`.
pub fn as_revision6(data: &[u8], doc: &PdfDocument) -> Result<Option<Vec<u8>>, ExtractError> {
    let Some(trailer) = doc.trailer().as_dict() else {
        return Ok(None);
    };
    let (reference, dict) = match trailer.get("Encrypt") {
        Some(Object::Reference(r)) => match doc.load_object(*r) {
            Ok(Object::Dictionary(d)) => (Some(*r), d),
            _ => return Ok(None),
        },
        Some(Object::Dictionary(d)) => (None, d.clone()),
        _ => return Ok(None),
    };
    if !matches!(dict.get("R"), Some(Object::Integer(5))) {
        return Ok(None);
    }
    let bytes = |key: &str, len: usize| match dict.get(key) {
        Some(Object::String(s)) if s.len() >= len => Ok(&s[..len]),
        _ => Err(ExtractError::corrupt(format!(
            "PDF: the R5 encryption dictionary has no valid /{key}"
        ))),
    };
    let (u, ue, o, oe) = (
        bytes("U", 48)?,
        bytes("UE", 32)?,
        bytes("O", 48)?,
        bytes("OE", 32)?,
    );
    let file_key = r5_file_key(u, ue, o, oe)?
        .ok_or_else(|| ExtractError::new(Reason::Encrypted, "PDF needs a password"))?;

    // Salts only need to be fixed for one file: derive them from the key, so the
    // same input always gives the same bytes.
    let salts = Sha256::digest([b"embedstream-r6".as_slice(), &file_key].concat());
    let (validation_salt, key_salt) = (&salts[..8], &salts[8..16]);
    let mut new_u = hash_2b(validation_salt);
    new_u.extend_from_slice(validation_salt);
    new_u.extend_from_slice(key_salt);
    let new_ue = aes_cbc(
        AesKeySize::Aes256,
        &hash_2b(key_salt),
        &[0; 16],
        &file_key,
        true,
    )?;
    let mut updated = dict;
    updated.insert("R".into(), Object::Integer(6));
    updated.insert("U".into(), Object::String(new_u));
    updated.insert("UE".into(), Object::String(new_ue));
    Ok(Some(append_update(data, trailer, reference, &updated)?))
}

/// R5's file key for the empty password, as user or as owner; `None` if it is neither.
fn r5_file_key(u: &[u8], ue: &[u8], o: &[u8], oe: &[u8]) -> Result<Option<Vec<u8>>, ExtractError> {
    let unwrap = |salt: &[&[u8]], wrapped: &[u8]| {
        let key = Sha256::digest(salt.concat());
        aes_cbc(AesKeySize::Aes256, &key, &[0; 16], wrapped, false)
    };
    if Sha256::digest(&u[32..40]).as_slice() == &u[..32] {
        return unwrap(&[&u[40..48]], ue).map(Some);
    }
    if Sha256::digest([&o[32..40], u].concat()).as_slice() == &o[..32] {
        return unwrap(&[&o[40..48], u], oe).map(Some);
    }
    Ok(None)
}

fn aes_cbc(
    size: AesKeySize,
    key: &[u8],
    iv: &[u8],
    data: &[u8],
    encrypt: bool,
) -> Result<Vec<u8>, ExtractError> {
    let cipher = active().symmetric();
    let out = if encrypt {
        cipher.aes_cbc_encrypt(size, key, iv, data, Padding::None)
    } else {
        cipher.aes_cbc_decrypt(size, key, iv, data, Padding::None)
    };
    out.map_err(|e| ExtractError::corrupt(format!("PDF: AES: {e}")))
}

/// ISO 32000-2 Algorithm 2.B for the empty password and no owner data: the hash that
/// revision 6 uses both to check a password and to unwrap `UE`.
fn hash_2b(salt: &[u8]) -> Vec<u8> {
    let mut k = Sha256::digest(salt).to_vec();
    let mut round = 0usize;
    loop {
        let k1 = k.repeat(64);
        let e = aes_cbc(AesKeySize::Aes128, &k[..16], &k[16..32], &k1, true)
            .expect("AES-128-CBC of whole blocks cannot fail");
        // The first 16 bytes as a big-endian number mod 3: 256 ≡ 1 (mod 3).
        k = match e[..16].iter().map(|&b| b as u32).sum::<u32>() % 3 {
            0 => Sha256::digest(&e).to_vec(),
            1 => Sha384::digest(&e).to_vec(),
            _ => Sha512::digest(&e).to_vec(),
        };
        round += 1;
        if round >= 64 && (*e.last().unwrap() as usize) <= round - 32 {
            break;
        }
    }
    k.truncate(32);
    k
}

/// `data` plus an incremental update: the new encryption dictionary (as its old
/// object, or inline in the trailer), a cross-reference section and a trailer whose
/// `/Prev` points at the file's last one.
fn append_update(
    data: &[u8],
    trailer: &HashMap<String, Object>,
    reference: Option<ObjectRef>,
    encrypt: &HashMap<String, Object>,
) -> Result<Vec<u8>, ExtractError> {
    let prev =
        last_startxref(data).ok_or_else(|| ExtractError::corrupt("PDF: no startxref to update"))?;
    let mut out = data.to_vec();
    if !out.ends_with(b"\n") {
        out.push(b'\n');
    }
    let mut new_trailer: HashMap<String, Object> = trailer
        .iter()
        .filter(|(k, _)| ["Size", "Root", "Info", "ID"].contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    new_trailer.insert("Prev".into(), Object::Integer(prev as i64));
    let mut text = String::new();
    match reference {
        Some(r) => {
            let offset = out.len();
            out.extend_from_slice(format!("{} {} obj\n", r.id, r.gen).as_bytes());
            out.extend_from_slice(&serialize(&Object::Dictionary(encrypt.clone())));
            out.extend_from_slice(b"\nendobj\n");
            new_trailer.insert("Encrypt".into(), Object::Reference(r));
            let _ = write!(text, "xref\n{} 1\n{offset:010} {:05} n\r\n", r.id, r.gen);
        }
        None => {
            new_trailer.insert("Encrypt".into(), Object::Dictionary(encrypt.clone()));
            text.push_str("xref\n0 0\n");
        }
    }
    let xref_at = out.len();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"trailer\n");
    out.extend_from_slice(&serialize(&Object::Dictionary(new_trailer)));
    out.extend_from_slice(format!("\nstartxref\n{xref_at}\n%%EOF\n").as_bytes());
    Ok(out)
}

fn last_startxref(data: &[u8]) -> Option<usize> {
    let at = data.windows(9).rposition(|w| w == b"startxref")?;
    let rest = std::str::from_utf8(&data[at + 9..(at + 40).min(data.len())]).ok()?;
    rest.split_whitespace().next()?.parse().ok()
}

/// PDF syntax for the objects an encryption dictionary or trailer holds; strings as hex.
fn serialize(object: &Object) -> Vec<u8> {
    let mut out = String::new();
    write_object(&mut out, object);
    out.into_bytes()
}

fn write_object(out: &mut String, object: &Object) {
    match object {
        Object::Null | Object::Stream { .. } => out.push_str("null"),
        Object::Boolean(b) => out.push_str(if *b { "true" } else { "false" }),
        Object::Integer(i) => {
            let _ = write!(out, "{i}");
        }
        Object::Real(r) => {
            let _ = write!(out, "{r}");
        }
        Object::String(s) => {
            out.push('<');
            for b in s {
                let _ = write!(out, "{b:02X}");
            }
            out.push('>');
        }
        Object::Name(n) => write_name(out, n),
        Object::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(' ');
                }
                write_object(out, item);
            }
            out.push(']');
        }
        Object::Dictionary(d) => {
            out.push_str("<<");
            let mut keys: Vec<&String> = d.keys().collect();
            keys.sort();
            for key in keys {
                write_name(out, key);
                out.push(' ');
                write_object(out, &d[key]);
            }
            out.push_str(">>");
        }
        Object::Reference(r) => {
            let _ = write!(out, "{} {} R", r.id, r.gen);
        }
    }
}

fn write_name(out: &mut String, name: &str) {
    out.push('/');
    for b in name.bytes() {
        if b.is_ascii_graphic() && !b"()<>[]{}/%#".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "#{b:02X}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_strings_are_escaped() {
        let mut dict = HashMap::new();
        dict.insert("Filter".to_string(), Object::Name("Standard".into()));
        dict.insert("U".to_string(), Object::String(vec![0, 0xff, b'(']));
        dict.insert(
            "A b".to_string(),
            Object::Array(vec![Object::Integer(-4), Object::Boolean(true)]),
        );
        let text = String::from_utf8(serialize(&Object::Dictionary(dict))).unwrap();
        assert_eq!(text, "<</A#20b [-4 true]/Filter /Standard/U <00FF28>>>");
    }

    /// U, UE, O and OE of an R5 file (Adobe's extension level 3) for these passwords.
    fn r5_entries(file_key: &[u8], user: &[u8], owner: &[u8]) -> [Vec<u8>; 4] {
        let (vs, ks, ovs, oks) = ([1u8; 8], [2u8; 8], [3u8; 8], [4u8; 8]);
        let mut u = Sha256::digest([user, &vs].concat()).to_vec();
        u.extend_from_slice(&vs);
        u.extend_from_slice(&ks);
        let wrap = |key: &[u8]| aes_cbc(AesKeySize::Aes256, key, &[0; 16], file_key, true).unwrap();
        let ue = wrap(&Sha256::digest([user, &ks].concat()));
        let mut o = Sha256::digest([owner, &ovs, &u].concat()).to_vec();
        o.extend_from_slice(&ovs);
        o.extend_from_slice(&oks);
        let oe = wrap(&Sha256::digest([owner, &oks, &u].concat()));
        [u, ue, o, oe]
    }

    #[test]
    fn r5_key_for_the_empty_password_as_user_or_owner() {
        let key: Vec<u8> = (0u8..32).collect();
        let [u, ue, o, oe] = r5_entries(&key, b"", b"owner");
        assert_eq!(r5_file_key(&u, &ue, &o, &oe).unwrap(), Some(key.clone()));
        let [u, ue, o, oe] = r5_entries(&key, b"user", b"");
        assert_eq!(r5_file_key(&u, &ue, &o, &oe).unwrap(), Some(key.clone()));
        let [u, ue, o, oe] = r5_entries(&key, b"user", b"owner");
        assert_eq!(r5_file_key(&u, &ue, &o, &oe).unwrap(), None);
    }

    #[test]
    fn finds_the_last_startxref() {
        let pdf = b"%PDF-1.7\n...startxref\n12\n%%EOF\n...startxref\r\n345\r\n%%EOF";
        assert_eq!(last_startxref(pdf), Some(345));
    }
}
