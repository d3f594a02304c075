//! Pinned state as data: every map of an instance directory read into
//! memory as bytes ([`StateImage`]), whatever its layout. Upgrades convert
//! an image of an older layout into this build's (see `upgrade`), and the
//! tests keep images of older layouts as fixtures (JSON, bytes in hex).

use std::{collections::BTreeMap, path::Path};

use aya::maps::MapType;
use serde::{Deserialize, Serialize};

use super::raw::RawMap;

/// One map: its shape and its entries (for arrays, only those not all
/// zero; per-CPU values are the CPUs' values one after the other, each
/// padded to 8 bytes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapImage {
    /// `bpf_map_type` as the kernel numbers it.
    pub kind: u32,
    pub key_size: usize,
    pub value_size: usize,
    pub max_entries: u32,
    pub flags: u32,
    /// Values per key (possible CPUs for per-CPU maps, else 1).
    pub per_cpu: usize,
    #[serde(with = "hex_entries")]
    pub entries: Entries,
}

/// A map's entries: (key, value) as bytes.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

impl MapImage {
    /// Reads the map pinned at `path`.
    pub fn read(path: &Path) -> std::io::Result<MapImage> {
        let m = RawMap::open(path)?;
        Ok(MapImage {
            kind: m.kind as u32,
            key_size: m.key_size,
            value_size: m.value_size,
            max_entries: m.max_entries,
            flags: m.flags,
            per_cpu: m.per_cpu,
            entries: m.entries()?,
        })
    }

    /// Whether the map is an array (a key is an index).
    pub fn is_array(&self) -> bool {
        self.kind == MapType::Array as u32 || self.kind == MapType::PerCpuArray as u32
    }

    /// The value at array index `i`, if not all zero.
    pub fn at(&self, i: u32) -> Option<&[u8]> {
        let key = i.to_ne_bytes();
        self.entries
            .iter()
            .find(|(k, _)| k[..] == key[..])
            .map(|(_, v)| &v[..])
    }
}

/// Every map of an instance directory, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateImage {
    pub maps: BTreeMap<String, MapImage>,
}

impl StateImage {
    /// Reads the maps `names` pinned in `dir` (those present).
    pub fn read(dir: &Path, names: &[&str]) -> std::io::Result<StateImage> {
        let mut maps = BTreeMap::new();
        for name in names {
            let path = dir.join(name);
            if path.exists() {
                maps.insert(name.to_string(), MapImage::read(&path)?);
            }
        }
        Ok(StateImage { maps })
    }
}

/// `entries` as a list of `[key, value]` hex strings.
mod hex_entries {
    use serde::{Deserialize, Deserializer, Serializer, de::Error, ser::SerializeSeq};

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn bytes(s: &str) -> Result<Vec<u8>, String> {
        if !s.len().is_multiple_of(2) {
            return Err(format!("odd-length hex {s:?}"));
        }
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| format!("{s:?}: {e}")))
            .collect()
    }

    pub fn serialize<S: Serializer>(e: &[(Vec<u8>, Vec<u8>)], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(e.len()))?;
        for (k, v) in e {
            seq.serialize_element(&[hex(k), hex(v)])?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<super::Entries, D::Error> {
        let raw: Vec<[String; 2]> = Vec::deserialize(d)?;
        raw.into_iter()
            .map(|[k, v]| {
                Ok((
                    bytes(&k).map_err(D::Error::custom)?,
                    bytes(&v).map_err(D::Error::custom)?,
                ))
            })
            .collect()
    }
}
