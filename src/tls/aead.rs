//! The AEAD behind ringside's TLS records (`tls::record`): aws-lc-rs or ring, whichever has
//! the faster AES-GCM on this CPU. Pure: no I/O.
//!
//! Bulk mTLS spends a third of both sidecars' CPU in AES-GCM (perf/RESULTS.md, issue 31).
//! aws-lc has two x86-64 AES-GCM paths: AVX-512 with VAES (used where the CPU has both) and
//! AES-NI with AVX. ring has a VAES + AVX2 path that aws-lc lacks: on a CPU with VAES but no
//! AVX-512 (AMD Zen 3, Intel Alder Lake) aws-lc falls back to AES-NI and ring seals and opens
//! 2.3× as fast (`cargo bench --bench tls -- tls_bulk_encrypt_decrypt/`). So AES-GCM records
//! go to ring exactly there; elsewhere, and for ChaCha20-Poly1305, aws-lc-rs, the provider
//! rustls already uses. Both produce the same bytes (tests below): the wire does not change.

use std::sync::LazyLock;

/// The tag every AEAD of TLS appends.
pub const TAG_LEN: usize = 16;

/// A record cipher's key for one direction.
pub enum RecordKey {
    /// aws-lc-rs' (every cipher).
    AwsLc(aws_lc_rs::aead::LessSafeKey),
    /// ring's (AES-GCM only). Boxed: 544 bytes of key schedule and GHASH powers inline, where
    /// aws-lc-rs keeps its context on the heap.
    Ring(Box<ring::aead::LessSafeKey>),
}

/// The AEADs TLS 1.2 and 1.3 records use here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cipher {
    /// AES-128-GCM.
    Aes128Gcm,
    /// AES-256-GCM.
    Aes256Gcm,
    /// ChaCha20-Poly1305.
    Chacha20Poly1305,
}

/// The AEAD refused: a tag that does not match (an altered or foreign record), or an input
/// longer than the AEAD allows.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused;

/// Whose AES-GCM seals and opens records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GcmBackend {
    /// aws-lc-rs (AVX-512 with VAES, or AES-NI with AVX).
    AwsLc,
    /// ring (VAES with AVX2).
    Ring,
}

/// What decides `GcmBackend` on x86-64.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuFeatures {
    /// Vector AES.
    pub vaes: bool,
    /// Vector carry-less multiplication (GHASH).
    pub vpclmulqdq: bool,
    /// AVX2.
    pub avx2: bool,
    /// AVX-512 F, DQ, BW and VL, as aws-lc requires them for its AVX-512 AES-GCM.
    pub avx512: bool,
}

/// ring where its VAES + AVX2 AES-GCM runs and aws-lc's AVX-512 one does not.
pub fn choose(cpu: CpuFeatures) -> GcmBackend {
    let vaes = cpu.vaes && cpu.vpclmulqdq;
    match vaes && cpu.avx2 && !cpu.avx512 {
        true => GcmBackend::Ring,
        false => GcmBackend::AwsLc,
    }
}

/// This process's choice, made once. `RINGSIDE_AES_GCM=ring` or `aws-lc` overrides it (to
/// compare the two on one machine); another value is ignored (the startup log says so).
pub fn gcm_backend() -> GcmBackend {
    static CHOSEN: LazyLock<GcmBackend> = LazyLock::new(|| {
        let forced = std::env::var(OVERRIDE).ok().and_then(|v| GcmBackend::named(&v));
        forced.unwrap_or_else(|| choose(cpu_features()))
    });
    *CHOSEN
}

/// The environment variable that overrides the CPU's choice.
pub const OVERRIDE: &str = "RINGSIDE_AES_GCM";

impl GcmBackend {
    /// The backend `RINGSIDE_AES_GCM` names, if it names one.
    pub fn named(value: &str) -> Option<GcmBackend> {
        match value {
            "ring" => Some(GcmBackend::Ring),
            "aws-lc" => Some(GcmBackend::AwsLc),
            _ => None,
        }
    }

    /// Its library, for the startup log.
    pub fn library(self) -> &'static str {
        match self {
            GcmBackend::AwsLc => "aws-lc-rs",
            GcmBackend::Ring => "ring",
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn cpu_features() -> CpuFeatures {
    use std::arch::is_x86_feature_detected as has;
    CpuFeatures {
        vaes: has!("vaes"),
        vpclmulqdq: has!("vpclmulqdq"),
        avx2: has!("avx2"),
        avx512: has!("avx512f") && has!("avx512dq") && has!("avx512bw") && has!("avx512vl"),
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_features() -> CpuFeatures {
    CpuFeatures::default()
}

impl RecordKey {
    /// `None`: the key has the wrong length for `cipher`.
    pub fn new(cipher: Cipher, key: &[u8]) -> Option<RecordKey> {
        Self::with_backend(cipher, key, gcm_backend())
    }

    /// As `new`, AES-GCM by `backend` (ChaCha20-Poly1305 is always aws-lc-rs').
    pub fn with_backend(cipher: Cipher, key: &[u8], backend: GcmBackend) -> Option<RecordKey> {
        use aws_lc_rs::aead as a;
        use ring::aead as r;
        match (cipher, backend) {
            (Cipher::Aes128Gcm, GcmBackend::Ring) => ring_key(&r::AES_128_GCM, key),
            (Cipher::Aes256Gcm, GcmBackend::Ring) => ring_key(&r::AES_256_GCM, key),
            (Cipher::Aes128Gcm, GcmBackend::AwsLc) => aws_lc_key(&a::AES_128_GCM, key),
            (Cipher::Aes256Gcm, GcmBackend::AwsLc) => aws_lc_key(&a::AES_256_GCM, key),
            (Cipher::Chacha20Poly1305, _) => aws_lc_key(&a::CHACHA20_POLY1305, key),
        }
    }

    /// AES-GCM (TLS 1.2 sends its explicit nonce), not ChaCha20-Poly1305.
    pub fn is_gcm(&self) -> bool {
        match self {
            RecordKey::AwsLc(k) => k.algorithm() != &aws_lc_rs::aead::CHACHA20_POLY1305,
            RecordKey::Ring(_) => true,
        }
    }

    /// Seal `in_out` in place; the tag is returned, not appended.
    pub fn seal(&self, nonce: [u8; 12], aad: &[u8], in_out: &mut [u8]) -> Result<[u8; TAG_LEN], Refused> {
        let mut tag = [0; TAG_LEN];
        match self {
            RecordKey::AwsLc(k) => {
                let nonce = aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce);
                let t = k.seal_in_place_separate_tag(nonce, aws_lc_rs::aead::Aad::from(aad), in_out);
                tag.copy_from_slice(t.map_err(|_| Refused)?.as_ref());
            }
            RecordKey::Ring(k) => {
                let nonce = ring::aead::Nonce::assume_unique_for_key(nonce);
                let t = k.seal_in_place_separate_tag(nonce, ring::aead::Aad::from(aad), in_out);
                tag.copy_from_slice(t.map_err(|_| Refused)?.as_ref());
            }
        }
        Ok(tag)
    }

    /// Open `in_out` (ciphertext then tag) in place: the plaintext's length, or an error when
    /// the tag does not match.
    pub fn open(&self, nonce: [u8; 12], aad: &[u8], in_out: &mut [u8]) -> Result<usize, Refused> {
        match self {
            RecordKey::AwsLc(k) => {
                let nonce = aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce);
                k.open_in_place(nonce, aws_lc_rs::aead::Aad::from(aad), in_out)
                    .map(|p| p.len())
                    .map_err(|_| Refused)
            }
            RecordKey::Ring(k) => {
                let nonce = ring::aead::Nonce::assume_unique_for_key(nonce);
                k.open_in_place(nonce, ring::aead::Aad::from(aad), in_out)
                    .map(|p| p.len())
                    .map_err(|_| Refused)
            }
        }
    }
}

fn aws_lc_key(alg: &'static aws_lc_rs::aead::Algorithm, key: &[u8]) -> Option<RecordKey> {
    let key = aws_lc_rs::aead::UnboundKey::new(alg, key).ok()?;
    Some(RecordKey::AwsLc(aws_lc_rs::aead::LessSafeKey::new(key)))
}

fn ring_key(alg: &'static ring::aead::Algorithm, key: &[u8]) -> Option<RecordKey> {
    let key = ring::aead::UnboundKey::new(alg, key).ok()?;
    Some(RecordKey::Ring(Box::new(ring::aead::LessSafeKey::new(key))))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CIPHERS: [(Cipher, usize); 3] =
        [(Cipher::Aes128Gcm, 16), (Cipher::Aes256Gcm, 32), (Cipher::Chacha20Poly1305, 32)];

    fn key_bytes(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + 3) as u8).collect()
    }

    #[test]
    fn the_override_names_a_backend_exactly_or_none() {
        assert_eq!(GcmBackend::named("ring"), Some(GcmBackend::Ring));
        assert_eq!(GcmBackend::named("aws-lc"), Some(GcmBackend::AwsLc));
        for other in ["", "Ring", "aws-lc-rs", "rign", "boringssl"] {
            assert_eq!(GcmBackend::named(other), None, "{other}");
        }
    }

    #[test]
    fn ring_and_aws_lc_seal_the_same_bytes_and_open_each_others_records() {
        let nonce = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0xff, 0x10];
        let aad = [0x17, 3, 3, 0x40, 0x11];
        for (cipher, key_len) in CIPHERS {
            let key = key_bytes(key_len);
            let ring = RecordKey::with_backend(cipher, &key, GcmBackend::Ring).unwrap();
            let aws = RecordKey::with_backend(cipher, &key, GcmBackend::AwsLc).unwrap();
            assert_eq!(ring.is_gcm(), cipher != Cipher::Chacha20Poly1305);
            // Around the AES block (16), ring's and aws-lc's wide strides (96, 256) and a full record.
            for len in [0, 1, 15, 16, 17, 95, 96, 97, 255, 256, 257, 1000, 16384, 16385] {
                let plain: Vec<u8> = (0..len).map(|i| (i * 31 + 5) as u8).collect();
                let (mut a, mut b) = (plain.clone(), plain.clone());
                let tag_a = ring.seal(nonce, &aad, &mut a).unwrap();
                let tag_b = aws.seal(nonce, &aad, &mut b).unwrap();
                assert_eq!((&a, tag_a), (&b, tag_b), "{cipher:?}, {len} bytes");
                if len > 0 {
                    assert_ne!(a, plain, "{cipher:?}, {len} bytes: sealed");
                }
                // Each opens the other's record.
                a.extend_from_slice(&tag_a);
                b.extend_from_slice(&tag_b);
                assert_eq!(aws.open(nonce, &aad, &mut a), Ok(len));
                assert_eq!(ring.open(nonce, &aad, &mut b), Ok(len));
                assert_eq!((&a[..len], &b[..len]), (&plain[..], &plain[..]));
            }
        }
    }

    #[test]
    fn a_changed_byte_tag_nonce_or_header_is_refused_by_both() {
        let nonce = [1; 12];
        let aad = [0x17, 3, 3, 0, 40];
        for (cipher, key_len) in CIPHERS {
            let key = key_bytes(key_len);
            for backend in [GcmBackend::Ring, GcmBackend::AwsLc] {
                let k = RecordKey::with_backend(cipher, &key, backend).unwrap();
                let mut sealed = b"twenty-four bytes of app".to_vec();
                let tag = k.seal(nonce, &aad, &mut sealed).unwrap();
                sealed.extend_from_slice(&tag);
                for at in [0, 23, 24, 39] {
                    let mut bad = sealed.clone();
                    bad[at] ^= 1;
                    assert_eq!(
                        k.open(nonce, &aad, &mut bad),
                        Err(Refused),
                        "{cipher:?} {backend:?}: byte {at}"
                    );
                }
                let mut other = [1; 12];
                other[11] = 2;
                assert_eq!(
                    k.open(other, &aad, &mut sealed.clone()),
                    Err(Refused),
                    "{cipher:?} {backend:?}: nonce"
                );
                assert_eq!(k.open(nonce, &[0x17, 3, 3, 0, 41], &mut sealed.clone()), Err(Refused));
                assert_eq!(k.open(nonce, &aad, &mut sealed[..TAG_LEN - 1].to_vec()), Err(Refused), "short");
                assert_eq!(k.open(nonce, &aad, &mut sealed), Ok(24));
            }
        }
    }

    #[test]
    fn a_key_of_the_wrong_length_is_refused() {
        for (cipher, key_len) in CIPHERS {
            for backend in [GcmBackend::Ring, GcmBackend::AwsLc] {
                assert!(RecordKey::with_backend(cipher, &key_bytes(key_len - 1), backend).is_none());
                assert!(RecordKey::with_backend(cipher, &key_bytes(key_len + 1), backend).is_none());
            }
        }
    }

    #[test]
    fn ring_only_where_it_has_vaes_with_avx2_and_aws_lc_has_no_avx512() {
        let zen3 = CpuFeatures { vaes: true, vpclmulqdq: true, avx2: true, avx512: false };
        assert_eq!(choose(zen3), GcmBackend::Ring);
        assert_eq!(choose(CpuFeatures { avx512: true, ..zen3 }), GcmBackend::AwsLc);
        assert_eq!(choose(CpuFeatures { vaes: false, ..zen3 }), GcmBackend::AwsLc);
        assert_eq!(choose(CpuFeatures { vpclmulqdq: false, ..zen3 }), GcmBackend::AwsLc);
        assert_eq!(choose(CpuFeatures { avx2: false, ..zen3 }), GcmBackend::AwsLc);
        assert_eq!(choose(CpuFeatures::default()), GcmBackend::AwsLc);
    }
}
