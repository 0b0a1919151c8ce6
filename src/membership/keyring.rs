//! Gossip encryption keyring (Consul's `encrypt` / `consul keyring`).
//!
//! Owns: parsing base64 keys, the set of installed keys, which one is
//! primary, and sealing/opening datagrams with AES-GCM through `ring::aead`.
//! The primary key encrypts every outgoing packet; every installed key is
//! tried when decrypting, which is what makes a rolling key rotation
//! possible (install everywhere, `use` everywhere, remove the old key).
//!
//! Must not depend on: sockets, foca, or anything else in the membership
//! layer. A [`Keyring`] is a cheap, shared handle (`Arc<RwLock<..>>`): the
//! copy held by the running worker sees every change made through a clone.
//!
//! Wire format of an encrypted datagram:
//! `[ENCRYPTED_VERSION][12-byte random nonce][ciphertext][16-byte GCM tag]`,
//! the version byte is also the additional authenticated data so it cannot
//! be flipped without failing authentication.

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rand::RngExt as _;
use ring::aead::{AES_128_GCM, AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

/// First byte of an encrypted datagram; lets a receiver tell encrypted
/// traffic from plaintext (which starts with 0) before trying any key.
pub const ENCRYPTED_VERSION: u8 = 1;

/// AES-GCM nonce length; fixed by the algorithm (96-bit nonces).
pub const NONCE_BYTES: usize = ring::aead::NONCE_LEN;

/// AES-GCM authentication tag length; fixed by the algorithm.
pub const TAG_BYTES: usize = 16;

/// Bytes an encrypted datagram carries on top of its plaintext payload.
pub const ENCRYPTION_OVERHEAD: usize = 1 + NONCE_BYTES + TAG_BYTES;

/// Key lengths Consul accepts for `encrypt` (AES-128, AES-192, AES-256).
pub const VALID_KEY_LENGTHS: [usize; 3] = [16, 24, 32];

/// Domain-separation label for expanding 24-byte keys: ring has no
/// AES-192-GCM, so a 24-byte key is hashed into an AES-256 key instead of
/// being rejected (keeps Consul's accepted key sizes working).
const AES192_EXPANSION_LABEL: &[u8] = b"trellis-gossip-aes192-expansion-v1";

/// Hex digits of SHA-256 shown in errors/logs to name a key without leaking it.
const FINGERPRINT_HEX_DIGITS: usize = 8;

/// Errors from key parsing, keyring management and packet (de)cryption.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    /// The key is not standard base64.
    #[error("gossip key is not valid base64: {source}")]
    InvalidBase64 {
        /// Decoder error.
        #[source]
        source: base64::DecodeError,
    },
    /// The key decoded to an unsupported number of bytes.
    #[error("gossip key must decode to 16, 24 or 32 bytes, got {len} bytes")]
    InvalidLength {
        /// Decoded length.
        len: usize,
    },
    /// `use`/`remove` of a key that is not installed.
    #[error("gossip key {fingerprint} is not installed")]
    NotInstalled {
        /// SHA-256 prefix of the key.
        fingerprint: String,
    },
    /// Removing the key that encrypts outgoing traffic.
    #[error("cannot remove the primary gossip key {fingerprint}; `use` another key first")]
    RemovePrimary {
        /// SHA-256 prefix of the key.
        fingerprint: String,
    },
    /// A keyring must have a primary key.
    #[error("a keyring needs at least one key")]
    Empty,
    /// ring refused to seal (only possible for absurdly large inputs).
    #[error("encrypting a {len}-byte gossip packet failed")]
    Seal {
        /// Plaintext length.
        len: usize,
    },
    /// The datagram is not in the encrypted format.
    #[error("datagram of {len} bytes is not an encrypted gossip packet")]
    NotEncrypted {
        /// Datagram length.
        len: usize,
    },
    /// No installed key authenticates the datagram.
    #[error("no installed gossip key decrypts this {len}-byte datagram")]
    NoKeyMatched {
        /// Datagram length.
        len: usize,
    },
}

struct InstalledKey {
    raw: Vec<u8>,
    aead: LessSafeKey,
}

/// Shared, mutable set of gossip keys. Index 0 is the primary key.
#[derive(Clone)]
pub struct Keyring {
    keys: Arc<RwLock<Vec<InstalledKey>>>,
}

impl fmt::Debug for Keyring {
    // Never print key material: fingerprints are enough to debug rotation.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys = self.read();
        f.debug_struct("Keyring").field("keys", &keys.iter().map(|k| fingerprint(&k.raw)).collect::<Vec<_>>()).finish()
    }
}

impl Keyring {
    /// A keyring with a single (primary) key.
    pub fn new(primary: &str) -> Result<Self, KeyringError> {
        Self::from_keys(primary, std::iter::empty::<&str>())
    }

    /// A keyring with `primary` plus extra installed (decrypt-only) keys;
    /// mirrors Consul's keyring file where the first key is primary.
    pub fn from_keys<'a>(primary: &str, others: impl IntoIterator<Item = &'a str>) -> Result<Self, KeyringError> {
        let mut keys = vec![InstalledKey::parse(primary)?];
        for other in others {
            let key = InstalledKey::parse(other)?;
            if !keys.iter().any(|k| k.raw == key.raw) {
                keys.push(key);
            }
        }
        Ok(Self { keys: Arc::new(RwLock::new(keys)) })
    }

    /// Installed keys as base64, primary first.
    pub fn list(&self) -> Vec<String> {
        self.read().iter().map(|k| BASE64.encode(&k.raw)).collect()
    }

    /// The primary key as base64.
    pub fn primary(&self) -> String {
        // A keyring is never empty: constructors require a primary and
        // `remove` refuses to drop it.
        self.read().first().map(|k| BASE64.encode(&k.raw)).unwrap_or_default()
    }

    /// Install a key for decryption (idempotent).
    pub fn install(&self, key: &str) -> Result<(), KeyringError> {
        let key = InstalledKey::parse(key)?;
        let mut keys = self.write();
        if !keys.iter().any(|k| k.raw == key.raw) {
            keys.push(key);
        }
        Ok(())
    }

    /// Make an installed key the primary (encrypting) key.
    pub fn use_key(&self, key: &str) -> Result<(), KeyringError> {
        let raw = decode_key(key)?;
        let mut keys = self.write();
        let pos = keys.iter().position(|k| k.raw == raw).ok_or_else(|| KeyringError::NotInstalled { fingerprint: fingerprint(&raw) })?;
        let chosen = keys.remove(pos);
        keys.insert(0, chosen);
        Ok(())
    }

    /// Remove a non-primary key.
    pub fn remove(&self, key: &str) -> Result<(), KeyringError> {
        let raw = decode_key(key)?;
        let mut keys = self.write();
        match keys.iter().position(|k| k.raw == raw) {
            None => Err(KeyringError::NotInstalled { fingerprint: fingerprint(&raw) }),
            Some(0) => Err(KeyringError::RemovePrimary { fingerprint: fingerprint(&raw) }),
            Some(pos) => {
                keys.remove(pos);
                Ok(())
            }
        }
    }

    /// Seal `plaintext` with the primary key into a datagram.
    pub fn encrypt(&self, plaintext: &[u8]) -> Result<Vec<u8>, KeyringError> {
        let mut nonce = [0u8; NONCE_BYTES];
        // Random 96-bit nonces: gossip rates are far below the ~2^32
        // messages per key where random-nonce collisions start to matter.
        rand::rng().fill(&mut nonce[..]);
        let mut out = Vec::with_capacity(ENCRYPTION_OVERHEAD + plaintext.len());
        out.push(ENCRYPTED_VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let keys = self.read();
        let primary = keys.first().ok_or(KeyringError::Empty)?;
        let tag = primary
            .aead
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from([ENCRYPTED_VERSION]), &mut out[1 + NONCE_BYTES..])
            .map_err(|_| KeyringError::Seal { len: plaintext.len() })?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Open a datagram with whichever installed key authenticates it.
    pub fn decrypt(&self, datagram: &[u8]) -> Result<Vec<u8>, KeyringError> {
        let len = datagram.len();
        if len < ENCRYPTION_OVERHEAD || datagram[0] != ENCRYPTED_VERSION {
            return Err(KeyringError::NotEncrypted { len });
        }
        let mut nonce = [0u8; NONCE_BYTES];
        nonce.copy_from_slice(&datagram[1..1 + NONCE_BYTES]);
        let sealed = &datagram[1 + NONCE_BYTES..];
        let keys = self.read();
        for key in keys.iter() {
            // open_in_place leaves garbage behind on failure, so every
            // attempt starts from a fresh copy of the ciphertext.
            let mut buf = sealed.to_vec();
            if let Ok(plain) = key.aead.open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from([ENCRYPTED_VERSION]), &mut buf) {
                let plain_len = plain.len();
                buf.truncate(plain_len);
                return Ok(buf);
            }
        }
        Err(KeyringError::NoKeyMatched { len })
    }

    fn read(&self) -> RwLockReadGuard<'_, Vec<InstalledKey>> {
        // A panic while holding the lock cannot leave the Vec half-updated
        // (every mutation is a single push/insert/remove), so recover.
        self.keys.read()
    }

    fn write(&self) -> RwLockWriteGuard<'_, Vec<InstalledKey>> {
        self.keys.write()
    }
}

impl InstalledKey {
    fn parse(encoded: &str) -> Result<Self, KeyringError> {
        let raw = decode_key(encoded)?;
        let unbound = match raw.len() {
            16 => UnboundKey::new(&AES_128_GCM, &raw),
            24 => {
                let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
                ctx.update(AES192_EXPANSION_LABEL);
                ctx.update(&raw);
                UnboundKey::new(&AES_256_GCM, ctx.finish().as_ref())
            }
            _ => UnboundKey::new(&AES_256_GCM, &raw),
        }
        // decode_key already validated the length, so ring cannot refuse.
        .map_err(|_| KeyringError::InvalidLength { len: raw.len() })?;
        Ok(Self { raw, aead: LessSafeKey::new(unbound) })
    }
}

fn decode_key(encoded: &str) -> Result<Vec<u8>, KeyringError> {
    let raw = BASE64.decode(encoded.trim()).map_err(|source| KeyringError::InvalidBase64 { source })?;
    if VALID_KEY_LENGTHS.contains(&raw.len()) { Ok(raw) } else { Err(KeyringError::InvalidLength { len: raw.len() }) }
}

/// Short SHA-256 prefix naming a key in logs and errors.
fn fingerprint(raw: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, raw);
    digest.as_ref().iter().take(FINGERPRINT_HEX_DIGITS / 2).map(|b| format!("{b:02x}")).collect()
}

/// A new random 32-byte key, base64 (what `consul keygen` prints).
pub fn keygen() -> String {
    let mut key = [0u8; 32];
    // ThreadRng is a CSPRNG seeded from the OS.
    rand::rng().fill(&mut key[..]);
    BASE64.encode(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(len: usize, byte: u8) -> String {
        BASE64.encode(vec![byte; len])
    }

    #[test]
    fn keys_of_16_24_and_32_bytes_round_trip_and_others_are_rejected() {
        for len in VALID_KEY_LENGTHS {
            let ring = Keyring::new(&key_of(len, 7)).expect("valid key");
            let sealed = ring.encrypt(b"hello").expect("seal");
            assert_eq!(sealed.len(), 5 + ENCRYPTION_OVERHEAD);
            assert_eq!(ring.decrypt(&sealed).expect("open"), b"hello");
        }
        for len in [0, 1, 15, 17, 31, 33, 64] {
            assert!(matches!(
                Keyring::new(&key_of(len, 7)),
                Err(KeyringError::InvalidLength { len: l }) if l == len
            ));
        }
        assert!(matches!(Keyring::new("not base64!!"), Err(KeyringError::InvalidBase64 { .. })));
    }

    #[test]
    fn a_packet_sealed_with_another_key_or_tampered_is_refused() {
        let a = Keyring::new(&keygen()).unwrap();
        let b = Keyring::new(&keygen()).unwrap();
        let sealed = a.encrypt(b"payload").unwrap();
        assert!(matches!(b.decrypt(&sealed), Err(KeyringError::NoKeyMatched { .. })));
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(a.decrypt(&bad).is_err(), "flipping byte {i} must fail");
        }
        assert!(a.decrypt(&sealed[..ENCRYPTION_OVERHEAD - 1]).is_err());
        assert!(a.decrypt(b"").is_err());
    }

    #[test]
    fn install_use_remove_follow_consul_semantics() {
        let k1 = keygen();
        let k2 = keygen();
        let ring = Keyring::new(&k1).unwrap();
        let view = ring.clone();
        assert!(matches!(ring.use_key(&k2), Err(KeyringError::NotInstalled { .. })));
        ring.install(&k2).unwrap();
        ring.install(&k2).unwrap();
        assert_eq!(view.list(), vec![k1.clone(), k2.clone()]);

        let old = ring.encrypt(b"old").unwrap();
        ring.use_key(&k2).unwrap();
        assert_eq!(view.primary(), k2);
        // Still readable: the old key is installed.
        assert_eq!(ring.decrypt(&old).unwrap(), b"old");
        assert!(matches!(ring.remove(&k2), Err(KeyringError::RemovePrimary { .. })));
        ring.remove(&k1).unwrap();
        assert_eq!(view.list(), vec![k2.clone()]);
        assert!(ring.decrypt(&old).is_err());
        assert!(matches!(ring.remove(&k1), Err(KeyringError::NotInstalled { .. })));
    }

    #[test]
    fn debug_output_never_contains_key_material() {
        let k = keygen();
        let ring = Keyring::new(&k).unwrap();
        assert!(!format!("{ring:?}").contains(&k));
    }

    #[test]
    fn keygen_yields_distinct_32_byte_keys() {
        let a = keygen();
        assert_eq!(BASE64.decode(&a).unwrap().len(), 32);
        assert_ne!(a, keygen());
    }
}
