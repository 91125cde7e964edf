//! Just enough DER to check a client certificate before depro uses it: when
//! it is valid, and whether a private key is the certificate's own. Pure
//! parsing, no cryptography: a key's public half is read from the key where
//! it is written down (RSA keys always; EC keys as Go and OpenSSL write
//! them; PKCS#8 v2 keys), and compared with the certificate's. A key whose
//! public half is not written down (an Ed25519 PKCS#8 v1 key) cannot be
//! checked this way: [`KeyMatch::Unknown`].

/// One DER element: its tag and its contents.
#[derive(Clone, Copy, Debug)]
struct Tlv<'a> {
    tag: u8,
    value: &'a [u8],
}

/// Reads the element at the start of `input`; returns it and the rest.
fn tlv(input: &[u8]) -> Option<(Tlv<'_>, &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let length = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let mut length = 0usize;
        for &b in &rest[..count] {
            length = (length << 8) | usize::from(b);
        }
        rest = &rest[count..];
        length
    };
    if rest.len() < length {
        return None;
    }
    Some((
        Tlv {
            tag,
            value: &rest[..length],
        },
        &rest[length..],
    ))
}

/// The elements inside a constructed element (a SEQUENCE, say).
fn children(value: &[u8]) -> Option<Vec<Tlv<'_>>> {
    let mut out = Vec::new();
    let mut rest = value;
    while !rest.is_empty() {
        let (element, next) = tlv(rest)?;
        out.push(element);
        rest = next;
    }
    Some(out)
}

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const BIT_STRING: u8 = 0x03;
const OCTET_STRING: u8 = 0x04;
const OID: u8 = 0x06;

const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const EC: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const ED25519: &[u8] = &[0x2b, 0x65, 0x70];

/// What a certificate says of itself that depro checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CertFacts {
    /// The X.509 version (1 to 3): TLS libraries take only 3.
    pub version: u8,
    /// Extensions marked critical that TLS libraries do not know (which
    /// makes them refuse the certificate), as dotted OIDs.
    pub unknown_critical: Vec<String>,
    /// Validity, as seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
    /// The algorithm of its public key (an OID) and the key's bits.
    algorithm: Vec<u8>,
    public_key: Vec<u8>,
}

/// Reads a certificate's validity and public key.
pub(crate) fn cert_facts(der: &[u8]) -> Option<CertFacts> {
    let (cert, _) = tlv(der)?;
    let tbs = children(cert.value)?.into_iter().next()?;
    let mut fields = children(tbs.value)?.into_iter();
    // [0] version is optional; then serial, signature algorithm, issuer,
    // validity, subject, subjectPublicKeyInfo.
    let mut field = fields.next()?;
    let mut version = 1;
    if field.tag == 0xa0 {
        let number = tlv(field.value)?.0;
        version = number.value.last().map_or(1, |v| v + 1);
        field = fields.next()?;
    }
    let _serial = field;
    let _signature = fields.next()?;
    let _issuer = fields.next()?;
    let validity = children(fields.next()?.value)?;
    let _subject = fields.next()?;
    let spki = children(fields.next()?.value)?;
    let algorithm = children(spki.first()?.value)?.first()?.value.to_vec();
    let public_key = bit_string(spki.get(1)?)?.to_vec();
    let mut unknown_critical = Vec::new();
    for field in fields {
        if field.tag != 0xa3 {
            continue; // issuer or subject unique IDs
        }
        for extension in children(tlv(field.value)?.0.value)? {
            let parts = children(extension.value)?;
            let id = parts.first().filter(|p| p.tag == OID)?.value;
            let critical = parts
                .get(1)
                .is_some_and(|p| p.tag == 0x01 && p.value.first().is_some_and(|b| *b != 0));
            // id-ce 15, 17, 19, 30, 31, 37 (2.5.29.x), and the SCT list:
            // what rustls-webpki reads.
            let known = matches!(id, [0x55, 0x1d, 15 | 17 | 19 | 30 | 31 | 37])
                || id == [0x2b, 0x06, 0x01, 0x04, 0x01, 0xd6, 0x79, 0x02, 0x04, 0x02];
            if critical && !known {
                unknown_critical.push(dotted(id));
            }
        }
    }
    Some(CertFacts {
        version,
        unknown_critical,
        not_before: time(validity.first()?)?,
        not_after: time(validity.get(1)?)?,
        algorithm,
        public_key,
    })
}

/// An OID as dotted numbers.
fn dotted(id: &[u8]) -> String {
    let mut parts: Vec<u64> = Vec::new();
    if let Some(first) = id.first() {
        parts.extend([u64::from(first / 40), u64::from(first % 40)]);
    }
    let mut value = 0u64;
    for &b in id.iter().skip(1) {
        value = (value << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            parts.push(value);
            value = 0;
        }
    }
    parts
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

fn bit_string<'a>(element: &Tlv<'a>) -> Option<&'a [u8]> {
    if element.tag != BIT_STRING {
        return None;
    }
    // The first byte counts unused bits (0 for keys).
    element.value.split_first().map(|(_, bits)| bits)
}

/// A UTCTime (YYMMDDhhmmssZ) or GeneralizedTime (YYYYMMDDhhmmssZ), as
/// seconds since the Unix epoch.
fn time(element: &Tlv<'_>) -> Option<i64> {
    let text = std::str::from_utf8(element.value).ok()?;
    let text = text.strip_suffix('Z')?;
    let digits = |s: &str| -> Option<i64> {
        s.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    let (year, rest) = match (element.tag, text.len()) {
        (0x17, 12) => {
            let yy = digits(&text[..2])?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &text[2..])
        }
        (0x18, 14) => (digits(&text[..4])?, &text[4..]),
        _ => return None,
    };
    let month = digits(&rest[..2])?;
    let day = digits(&rest[2..4])?;
    let (h, m, s) = (
        digits(&rest[4..6])?,
        digits(&rest[6..8])?,
        digits(&rest[8..10])?,
    );
    Some(days_from_civil(year, month, day) * 86400 + h * 3600 + m * 60 + s)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// How a private key relates to a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeyMatch {
    Matches,
    /// The key is another one than the certificate's.
    Mismatch,
    /// The key does not say its public half (or is of a kind depro does not
    /// read): the check cannot tell.
    Unknown,
}

/// The key's format, as PEM names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeyFormat {
    /// `RSA PRIVATE KEY`
    Pkcs1,
    /// `PRIVATE KEY`
    Pkcs8,
    /// `EC PRIVATE KEY`
    Sec1,
}

impl KeyFormat {
    /// The format of the first private key in a PEM text, by its label.
    pub(crate) fn of_pem(pem: &[u8]) -> Option<KeyFormat> {
        let text = String::from_utf8_lossy(pem);
        text.lines().find_map(|line| match line.trim() {
            "-----BEGIN RSA PRIVATE KEY-----" => Some(KeyFormat::Pkcs1),
            "-----BEGIN EC PRIVATE KEY-----" => Some(KeyFormat::Sec1),
            "-----BEGIN PRIVATE KEY-----" => Some(KeyFormat::Pkcs8),
            _ => None,
        })
    }
}

/// Whether the private key `key` (DER, in `format`) belongs to `cert`.
pub(crate) fn key_matches(cert: &CertFacts, format: KeyFormat, key: &[u8]) -> KeyMatch {
    match public_half(format, key) {
        Some((algorithm, public)) if algorithm == cert.algorithm => {
            if algorithm == RSA {
                // Compare as numbers: the certificate's RSAPublicKey.
                let theirs = rsa_numbers(&cert.public_key);
                if theirs.is_some() && theirs == rsa_numbers(&public) {
                    KeyMatch::Matches
                } else {
                    KeyMatch::Mismatch
                }
            } else if public == cert.public_key {
                KeyMatch::Matches
            } else {
                KeyMatch::Mismatch
            }
        }
        Some(_) => KeyMatch::Mismatch, // another algorithm altogether
        None => KeyMatch::Unknown,
    }
}

/// The key's algorithm and its public half as the certificate would write
/// it (RSA: an RSAPublicKey; EC, Ed25519: the point's bits).
fn public_half(format: KeyFormat, key: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    match format {
        KeyFormat::Pkcs1 => Some((RSA.to_vec(), rsa_public_of_private(key)?)),
        KeyFormat::Sec1 => Some((EC.to_vec(), ec_public(key)?)),
        KeyFormat::Pkcs8 => {
            let (info, _) = tlv(key)?;
            let fields = children(info.value)?;
            let algorithm = children(fields.get(1)?.value)?;
            let oid = algorithm.first().filter(|e| e.tag == OID)?.value.to_vec();
            let inner = fields.get(2).filter(|e| e.tag == OCTET_STRING)?.value;
            let public = if oid == RSA {
                rsa_public_of_private(inner)?
            } else if oid == EC {
                ec_public(inner)?
            } else if oid == ED25519 {
                // Only PKCS#8 v2 writes it: [1] publicKey.
                let field = fields.iter().find(|e| e.tag == 0x81 || e.tag == 0xa1)?;
                match field.tag {
                    0x81 => field.value.split_first()?.1.to_vec(),
                    _ => bit_string(&tlv(field.value)?.0)?.to_vec(),
                }
            } else {
                return None;
            };
            Some((oid, public))
        }
    }
}

/// An RSAPrivateKey's public half, as an RSAPublicKey (modulus, exponent).
fn rsa_public_of_private(der: &[u8]) -> Option<Vec<u8>> {
    let (key, _) = tlv(der)?;
    let fields = children(key.value)?;
    let (modulus, exponent) = (fields.get(1)?, fields.get(2)?);
    (modulus.tag == INTEGER && exponent.tag == INTEGER).then(|| {
        let mut body = Vec::new();
        for number in [modulus, exponent] {
            body.extend(encode(INTEGER, number.value));
        }
        encode(SEQUENCE, &body)
    })
}

/// An RSAPublicKey's modulus and exponent, without leading zeros.
fn rsa_numbers(der: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let (key, _) = tlv(der)?;
    let fields = children(key.value)?;
    let strip = |v: &[u8]| {
        let start = v.iter().position(|b| *b != 0).unwrap_or(v.len());
        v[start..].to_vec()
    };
    Some((strip(fields.first()?.value), strip(fields.get(1)?.value)))
}

/// An ECPrivateKey's [1] publicKey, when written.
fn ec_public(der: &[u8]) -> Option<Vec<u8>> {
    let (key, _) = tlv(der)?;
    let fields = children(key.value)?;
    let field = fields.iter().find(|e| e.tag == 0xa1)?;
    Some(bit_string(&tlv(field.value)?.0)?.to_vec())
}

fn encode(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let length = value.len();
    if length < 0x80 {
        out.push(length as u8);
    } else {
        let bytes: Vec<u8> = length
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(value);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_count_from_the_epoch() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11017);
        assert_eq!(days_from_civil(2026, 12, 7), 20794);
        let utc = Tlv {
            tag: 0x17,
            value: b"261207020000Z",
        };
        assert_eq!(time(&utc), Some(20794 * 86400 + 2 * 3600));
        let generalized = Tlv {
            tag: 0x18,
            value: b"20500101000000Z",
        };
        assert_eq!(
            time(&generalized),
            Some(days_from_civil(2050, 1, 1) * 86400)
        );
        let bad = Tlv {
            tag: 0x17,
            value: b"26120702000Z",
        };
        assert_eq!(time(&bad), None);
    }

    fn pem(text: &str) -> ureq::tls::PemItem<'static> {
        ureq::tls::parse_pem(text.as_bytes())
            .next()
            .unwrap()
            .unwrap()
    }

    fn cert(text: &str) -> CertFacts {
        match pem(text) {
            ureq::tls::PemItem::Certificate(c) => cert_facts(c.der()).unwrap(),
            _ => panic!("not a certificate"),
        }
    }

    fn check(cert_text: &str, key_text: &str) -> KeyMatch {
        let ureq::tls::PemItem::PrivateKey(key) = pem(key_text) else {
            panic!("not a key")
        };
        let format = KeyFormat::of_pem(key_text.as_bytes()).unwrap();
        key_matches(&cert(cert_text), format, key.der())
    }

    const EC_CRT: &str = include_str!("../../tests/data/tls/ec.crt");
    const EC_KEY: &str = include_str!("../../tests/data/tls/ec.key");
    const RSA_CRT: &str = include_str!("../../tests/data/tls/rsa.crt");
    const RSA_KEY: &str = include_str!("../../tests/data/tls/rsa.key");

    #[test]
    fn a_key_is_told_from_another_in_every_format_that_writes_its_public_half() {
        let other_ec = include_str!("../../tests/data/tls/other-ec.key");
        assert_eq!(check(EC_CRT, EC_KEY), KeyMatch::Matches);
        let ec_pkcs8 = include_str!("../../tests/data/tls/ec.pkcs8.key");
        assert_eq!(check(EC_CRT, ec_pkcs8), KeyMatch::Matches);
        assert_eq!(check(EC_CRT, other_ec), KeyMatch::Mismatch);
        assert_eq!(check(RSA_CRT, RSA_KEY), KeyMatch::Matches);
        let rsa_pkcs8 = include_str!("../../tests/data/tls/rsa.pkcs8.key");
        assert_eq!(check(RSA_CRT, rsa_pkcs8), KeyMatch::Matches);
        assert_eq!(check(RSA_CRT, EC_KEY), KeyMatch::Mismatch);
        assert_eq!(check(EC_CRT, RSA_KEY), KeyMatch::Mismatch);
        // An Ed25519 PKCS#8 v1 key does not write its public half.
        let ed_crt = include_str!("../../tests/data/tls/ed.crt");
        let ed_key = include_str!("../../tests/data/tls/ed.key");
        assert_eq!(check(ed_crt, ed_key), KeyMatch::Unknown);
        assert_eq!(check(EC_CRT, ed_key), KeyMatch::Unknown);
    }

    #[test]
    fn a_certificate_says_when_it_is_valid() {
        let day = |y, m, d| days_from_civil(y, m, d) * 86400;
        let expired = cert(include_str!("../../tests/data/tls/ec-expired.crt"));
        assert_eq!(
            (expired.not_before, expired.not_after),
            (day(2020, 1, 1), day(2021, 1, 1))
        );
        let future = cert(include_str!("../../tests/data/tls/ec-future.crt"));
        assert_eq!(future.not_before, day(2036, 1, 1));
        let current = cert(EC_CRT);
        assert!(current.not_before < current.not_after);
        assert_eq!((current.version, current.unknown_critical.len()), (3, 0));
        let v1 = cert(include_str!("../../tests/data/tls/ec-v1.crt"));
        assert_eq!(v1.version, 1, "TLS refuses it");
    }

    #[test]
    fn lengths_of_any_size_read_back() {
        for size in [0usize, 5, 127, 128, 300, 70_000] {
            let value = vec![7u8; size];
            let der = encode(OCTET_STRING, &value);
            let (element, rest) = tlv(&der).unwrap();
            assert_eq!(
                (element.tag, element.value.len(), rest.len()),
                (OCTET_STRING, size, 0)
            );
        }
        assert!(
            tlv(&[0x30, 0x85, 1, 1, 1, 1, 1]).is_none(),
            "5 length bytes"
        );
        assert!(tlv(&[0x30, 0x05, 1]).is_none(), "truncated");
    }
}
