//! Identifiers: document ids (16 bytes, the time they were made then random ones, printed in
//! base58check as automerge-repo prints them, so ids map one to one) and device ids.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A document id: 16 bytes, shown in base58check. Serialized as its 16 raw bytes in binary
/// formats (the wire protocol) and as its base58check string in human-readable ones (JSON).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DocId(pub [u8; 16]);

impl Serialize for DocId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_string())
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for DocId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            <[u8; 16]>::deserialize(d).map(DocId)
        }
    }
}

impl DocId {
    /// A new id: the time it is made (milliseconds since the Unix epoch, modulo 2^32: the 4
    /// low bytes, big-endian), then 12 random bytes. Ids made later sort after those made
    /// earlier (within a 49.7-day cycle), so a store's keys for new documents (the device's
    /// and the relay's: they start with the document id) go to one place in its ordered tree,
    /// which stays in memory and in the CPU's caches however many documents the store holds,
    /// not to a random place among all of them. The 96 random bits keep the ids made in one
    /// millisecond apart. In base58 (as shown), ids made in the same second share their first
    /// three or four characters, so a prefix that names one of them takes that many more than
    /// with random ids; ids made an hour apart share about one. Only the random part may be
    /// used to spread ids over buckets. Anyone who sees an id can tell when in its cycle it
    /// was made. Documents made offline reach a relay later than newer ones, each next to the
    /// others made at its time.
    pub fn generate() -> DocId {
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        DocId::at(millis, rand::random())
    }

    /// What [`generate`](Self::generate) was called before ids began with their time.
    #[deprecated(note = "use DocId::generate")]
    pub fn random() -> DocId {
        DocId::generate()
    }

    /// The id made at `millis` (ms since the Unix epoch) with `random` for the rest.
    pub fn at(millis: u64, random: [u8; 12]) -> DocId {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&(millis as u32).to_be_bytes());
        id[4..].copy_from_slice(&random);
        DocId(id)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&bs58::encode(self.0).with_check().into_string())
    }
}

impl fmt::Debug for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DocId({self})")
    }
}

/// Why a string is not a document id.
#[derive(Debug, thiserror::Error)]
#[error("'{0}' is not a document id (expected base58check of 16 bytes)")]
pub struct BadDocId(pub String);

impl FromStr for DocId {
    type Err = BadDocId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = bs58::decode(s)
            .with_check(None)
            .into_vec()
            .map_err(|_| BadDocId(s.to_string()))?;
        let arr: [u8; 16] = bytes.try_into().map_err(|_| BadDocId(s.to_string()))?;
        Ok(DocId(arr))
    }
}

/// A device (store) identity: 16 random bytes made when a store is first created. It is also
/// the Automerge actor id of every change the device makes (see docs/architecture.md,
/// "Identity").
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeviceId(pub [u8; 16]);

impl DeviceId {
    /// A fresh random device id.
    pub fn random() -> DeviceId {
        DeviceId(rand::random())
    }

    /// The Automerge actor this device writes as.
    pub fn actor(&self) -> automerge::ActorId {
        automerge::ActorId::from(&self.0[..])
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doc_id_round_trips_through_base58check() {
        let id = DocId::generate();
        let s = id.to_string();
        assert_eq!(s.parse::<DocId>().unwrap(), id);
        assert!("not-an-id".parse::<DocId>().is_err());
        let mut broken = s.clone();
        broken.pop();
        assert!(broken.parse::<DocId>().is_err());
    }

    #[test]
    fn doc_ids_sort_by_when_they_were_made() {
        let earlier = DocId::at(1_700_000_000_000, [0xff; 12]);
        let later = DocId::at(1_700_000_000_001, [0; 12]);
        assert!(earlier.as_bytes() < later.as_bytes());
        assert_ne!(DocId::generate(), DocId::generate());
    }
}
