//! HKDF-SHA256 (RFC 5869) for the TLS 1.3 key schedule of the SHA-256 suites, on SHA-256's
//! compression function (the `sha2` crate's, with the CPU's SHA instructions where it has
//! them). Pure: bytes in, bytes out.
//!
//! Why not aws-lc-rs' HKDF, which rustls uses by default: a resumed mTLS handshake runs ≈ 30
//! HKDF steps and HMACs at each end, and each of aws-lc's starts over from the key (two
//! SHA-256 blocks for the pads), gathers its `info` into a new `Vec` and goes through EVP's
//! layers. Here a key's pads are absorbed once, when rustls makes the expander for a secret
//! (and rustls expands each secret several times: key, IV, next secret), and each step is
//! then the blocks of its own message, on the stack (perf/RESULTS.md has the measurement).

use rustls::crypto::hmac::Tag;
use rustls::crypto::tls13::{Hkdf, HkdfExpander, OkmBlock, OutputLengthError};
use sha2::digest::generic_array::GenericArray;
use zeroize::Zeroize;

/// HKDF over HMAC-SHA256, as the TLS 1.3 suites with SHA-256 use it.
pub struct HkdfSha256;

impl Hkdf for HkdfSha256 {
    fn extract_from_zero_ikm(&self, salt: Option<&[u8]>) -> Box<dyn HkdfExpander> {
        self.extract_from_secret(salt, &[0; LEN])
    }

    fn extract_from_secret(&self, salt: Option<&[u8]>, secret: &[u8]) -> Box<dyn HkdfExpander> {
        // RFC 5869 §2.2: no salt is HashLen zero bytes.
        let mut prk = HmacKey::new(salt.unwrap_or(&[0; LEN])).sign(&[secret]);
        let expander = Box::new(Expander(HmacKey::new(&prk)));
        prk.zeroize();
        expander
    }

    fn expander_for_okm(&self, okm: &OkmBlock) -> Box<dyn HkdfExpander> {
        Box::new(Expander(HmacKey::new(okm.as_ref())))
    }

    fn hmac_sign(&self, key: &OkmBlock, message: &[u8]) -> Tag {
        let mut mac = HmacKey::new(key.as_ref()).sign(&[message]);
        let tag = Tag::new(&mac);
        mac.zeroize();
        tag
    }
}

/// HKDF-Expand under one pseudorandom key.
struct Expander(HmacKey);

impl Expander {
    /// RFC 5869 §2.3: T(n) = HMAC(PRK, T(n-1) | info | n), the output their concatenation.
    fn expand(&self, info: &[&[u8]], output: &mut [u8]) {
        let mut previous = [0u8; LEN];
        for (i, chunk) in output.chunks_mut(LEN).enumerate() {
            let counter = [i as u8 + 1];
            let carried: &[u8] = if i == 0 { &[] } else { &previous };
            let mut h = self.0.inner();
            h.update(carried);
            for part in info {
                h.update(part);
            }
            h.update(&counter);
            previous = self.0.outer(h);
            chunk.copy_from_slice(&previous[..chunk.len()]);
        }
        previous.zeroize();
    }
}

impl HkdfExpander for Expander {
    fn expand_slice(&self, info: &[&[u8]], output: &mut [u8]) -> Result<(), OutputLengthError> {
        if output.len() > 255 * LEN {
            return Err(OutputLengthError);
        }
        self.expand(info, output);
        Ok(())
    }

    fn expand_block(&self, info: &[&[u8]]) -> OkmBlock {
        let mut block = [0u8; LEN];
        self.expand(info, &mut block);
        let okm = OkmBlock::new(&block);
        block.zeroize();
        okm
    }

    fn hash_len(&self) -> usize {
        LEN
    }
}

/// SHA-256's output and block lengths.
const LEN: usize = 32;
const BLOCK: usize = 64;

/// SHA-256's initial state (FIPS 180-4 §5.3.3).
const INITIAL: [u32; 8] =
    [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];

/// An HMAC-SHA256 key (RFC 2104) with its two pads already hashed: the states after the
/// first block of the inner and of the outer hash.
struct HmacKey {
    inner: [u32; 8],
    outer: [u32; 8],
}

impl HmacKey {
    fn new(key: &[u8]) -> HmacKey {
        let mut padded = [0u8; BLOCK];
        if key.len() > BLOCK {
            // Longer keys are hashed first (never in TLS 1.3, whose keys are one hash long).
            let mut h = Sha256::from(INITIAL, 0);
            h.update(key);
            padded[..LEN].copy_from_slice(&h.finish());
        } else {
            padded[..key.len()].copy_from_slice(key);
        }
        let pad = |byte: u8| {
            let mut block = padded.map(|b| b ^ byte);
            let mut state = INITIAL;
            compress(&mut state, &block);
            block.zeroize();
            state
        };
        let key = HmacKey { inner: pad(0x36), outer: pad(0x5c) };
        padded.zeroize();
        key
    }

    /// The inner hash, ready for the message.
    fn inner(&self) -> Sha256 {
        Sha256::from(self.inner, BLOCK as u64)
    }

    /// The MAC, from the inner hash fed the whole message.
    fn outer(&self, inner: Sha256) -> [u8; LEN] {
        let mut digest = inner.finish();
        let mut h = Sha256::from(self.outer, BLOCK as u64);
        h.update(&digest);
        digest.zeroize();
        h.finish()
    }

    fn sign(&self, message: &[&[u8]]) -> [u8; LEN] {
        let mut h = self.inner();
        for part in message {
            h.update(part);
        }
        self.outer(h)
    }
}

impl Drop for HmacKey {
    fn drop(&mut self) {
        self.inner.zeroize();
        self.outer.zeroize();
    }
}

/// SHA-256 fed in parts, from a state after `done` bytes (whole blocks).
struct Sha256 {
    state: [u32; 8],
    pending: [u8; BLOCK],
    filled: usize,
    total: u64,
}

impl Sha256 {
    fn from(state: [u32; 8], done: u64) -> Sha256 {
        Sha256 { state, pending: [0; BLOCK], filled: 0, total: done }
    }

    fn update(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        if self.filled > 0 {
            let take = (BLOCK - self.filled).min(data.len());
            self.pending[self.filled..self.filled + take].copy_from_slice(&data[..take]);
            self.filled += take;
            data = &data[take..];
            if self.filled < BLOCK {
                return;
            }
            compress(&mut self.state, &self.pending);
            self.filled = 0;
        }
        let mut blocks = data.chunks_exact(BLOCK);
        for block in &mut blocks {
            compress(&mut self.state, block.try_into().expect("chunks_exact gives whole blocks"));
        }
        let rest = blocks.remainder();
        self.pending[..rest.len()].copy_from_slice(rest);
        self.filled = rest.len();
    }

    /// FIPS 180-4 §5.1.1: a 1 bit, zeros, and the message length in bits, to a whole block.
    fn finish(mut self) -> [u8; LEN] {
        let bits = self.total * 8;
        self.pending[self.filled] = 0x80;
        self.pending[self.filled + 1..].fill(0);
        if self.filled + 1 > BLOCK - 8 {
            compress(&mut self.state, &self.pending);
            self.pending.fill(0);
        }
        self.pending[BLOCK - 8..].copy_from_slice(&bits.to_be_bytes());
        compress(&mut self.state, &self.pending);
        let mut digest = [0u8; LEN];
        for (out, word) in digest.chunks_exact_mut(4).zip(self.state) {
            out.copy_from_slice(&word.to_be_bytes());
        }
        digest
    }
}

impl Drop for Sha256 {
    fn drop(&mut self) {
        self.state.zeroize();
        self.pending.zeroize();
    }
}

fn compress(state: &mut [u32; 8], block: &[u8; BLOCK]) {
    sha2::compress256(state, std::slice::from_ref(GenericArray::from_slice(block)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::{hkdf, hmac};

    /// RFC 5869's test case 1 (SHA-256, 42 bytes out).
    #[test]
    fn rfc_5869s_first_test_case_comes_out() {
        let ikm = [0x0b; 22];
        let salt: Vec<u8> = (0x00..=0x0c).collect();
        let info: Vec<u8> = (0xf0..=0xf9).collect();
        let mut okm = [0u8; 42];
        HkdfSha256.extract_from_secret(Some(&salt), &ikm).expand_slice(&[&info], &mut okm).unwrap();
        let want = "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865";
        assert_eq!(hex(&okm), want);
    }

    /// Against aws-lc-rs (what rustls used before) for keys, salts, messages and outputs of
    /// every length around SHA-256's block and padding edges.
    #[test]
    fn hmac_and_hkdf_agree_with_aws_lc_across_block_edges() {
        let bytes: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        for len in (0..140).chain([255, 256, 300]) {
            let data = &bytes[..len];
            // HMAC with `data` as the key (longer than a block: hashed first) and as message.
            let key = &bytes[len / 3..len / 3 + 32];
            let ours = HmacKey::new(data).sign(&[&data[..len / 2], &data[len / 2..]]);
            let theirs = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, data), data);
            assert_eq!(ours, theirs.as_ref(), "HMAC, {len} bytes");
            let tag = HkdfSha256.hmac_sign(&OkmBlock::new(key), data);
            assert_eq!(tag.as_ref(), hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data).as_ref());
            // HKDF: `data` as salt, secret and info; outputs up to a few blocks.
            let out_len = 1 + len % 97;
            let mut ours = vec![0u8; out_len];
            HkdfSha256.extract_from_secret(Some(key), data).expand_slice(&[data, b"x"], &mut ours).unwrap();
            let mut theirs = vec![0u8; out_len];
            let info = [data, b"x".as_slice()];
            hkdf::Salt::new(hkdf::HKDF_SHA256, key)
                .extract(data)
                .expand(&info, Len(out_len))
                .unwrap()
                .fill(&mut theirs)
                .unwrap();
            assert_eq!(ours, theirs, "HKDF, {len} bytes in, {out_len} out");
        }
    }

    #[test]
    fn no_salt_is_a_hash_of_zeros_and_a_zero_secret_is_too() {
        let a = HkdfSha256.extract_from_zero_ikm(None).expand_block(&[b"label"]);
        let b = HkdfSha256.extract_from_secret(Some(&[0; 32]), &[0; 32]).expand_block(&[b"label"]);
        assert_eq!(a.as_ref(), b.as_ref());
        let mut too_long = vec![0u8; 255 * 32 + 1];
        assert!(HkdfSha256.extract_from_zero_ikm(None).expand_slice(&[], &mut too_long).is_err());
    }

    struct Len(usize);

    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}
