//! Maps as bytes: a pinned map of any layout, read and written through the
//! `bpf(2)` syscall with keys and values as byte strings of the sizes the
//! kernel reports. The typed maps of the rest of the data plane know this
//! build's layout only; converting the state of an older layout (an upgrade) and the tests' fixtures of such state need maps whose
//! types this build does not have.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use aya::maps::{MapInfo, MapType};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// `union bpf_attr` for the batch commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Writes `count` consecutive values (`values`, `value_size` bytes each)
/// at array indexes `first..first + count` of the map behind `fd`, in one
/// `BPF_MAP_UPDATE_BATCH` call (Linux 5.6 and later): a table of thousands
/// of chunks costs one syscall instead of one per chunk.
pub fn update_array_batch(
    fd: std::os::fd::BorrowedFd<'_>,
    first: u32,
    values: &[u8],
    value_size: usize,
) -> std::io::Result<()> {
    assert!(values.len().is_multiple_of(value_size), "whole values");
    let count = values.len() / value_size;
    let keys: Vec<u32> = (first..first + count as u32).collect();
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: count as u32,
        map_fd: fd.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    bpf(BPF_MAP_UPDATE_BATCH, &mut attr)?;
    if attr.count as usize != count {
        return Err(std::io::Error::other(format!(
            "the kernel wrote {} of {count} values",
            attr.count
        )));
    }
    Ok(())
}

/// Reads values `first..first + count` of the array map behind `fd`
/// (`value_size` bytes each) into `out`, in one `BPF_MAP_LOOKUP_BATCH`
/// call (Linux 5.6 and later).
pub fn lookup_array_batch(
    fd: std::os::fd::BorrowedFd<'_>,
    first: u32,
    count: u32,
    value_size: usize,
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    out.resize(count as usize * value_size, 0);
    let mut keys = vec![0u32; count as usize];
    // The batch position: the kernel starts after the key `in_batch`
    // points at (none: at the first key) and says where it stopped.
    let mut in_batch = first.wrapping_sub(1);
    let mut out_batch = 0u32;
    let mut attr = BatchAttr {
        in_batch: if first == 0 {
            0
        } else {
            &mut in_batch as *mut u32 as u64
        },
        out_batch: &mut out_batch as *mut u32 as u64,
        keys: keys.as_mut_ptr() as u64,
        values: out.as_mut_ptr() as u64,
        count,
        map_fd: fd.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    match bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) {
        Ok(_) => {}
        // ENOENT: the end of the map was reached; `count` says how far.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        Err(e) => return Err(e),
    }
    if attr.count != count {
        return Err(std::io::Error::other(format!(
            "the kernel read {} of {count} values",
            attr.count
        )));
    }
    Ok(())
}

/// `union bpf_attr` for the map element commands.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value_or_next: u64,
    flags: u64,
}

/// `union bpf_attr` for `BPF_OBJ_GET`.
#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: `attr` is a valid, initialised `bpf_attr` prefix for `cmd`
    // whose pointers (if any) point at live buffers of the sizes the kernel
    // expects for the map.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A map opened by bytes.
pub struct RawMap {
    fd: OwnedFd,
    /// The kernel's description (kind, key and value size, capacity).
    pub kind: MapType,
    pub key_size: usize,
    pub value_size: usize,
    pub max_entries: u32,
    pub flags: u32,
    /// Values per key: the number of possible CPUs for per-CPU maps, else 1.
    pub per_cpu: usize,
}

impl RawMap {
    /// Opens the map pinned at `path`.
    pub fn open(path: &Path) -> std::io::Result<RawMap> {
        let info = MapInfo::from_pin(path).map_err(std::io::Error::other)?;
        let kind = info.map_type().map_err(std::io::Error::other)?;
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(std::io::Error::other)?;
        let mut attr = ObjAttr {
            pathname: c.as_ptr() as u64,
            ..ObjAttr::default()
        };
        let fd = bpf(BPF_OBJ_GET, &mut attr)?;
        // SAFETY: BPF_OBJ_GET returned a new fd that we now own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let per_cpu = match kind {
            MapType::PerCpuArray | MapType::PerCpuHash | MapType::LruPerCpuHash => {
                aya::util::nr_cpus().map_err(|(_, e)| e)?
            }
            _ => 1,
        };
        Ok(RawMap {
            fd,
            kind,
            key_size: info.key_size() as usize,
            value_size: info.value_size() as usize,
            max_entries: info.max_entries(),
            flags: info.map_flags(),
            per_cpu,
        })
    }

    /// Bytes of one value as the syscalls move it: per-CPU values are
    /// rounded up to 8 bytes each, one after the other.
    pub fn value_len(&self) -> usize {
        if self.is_per_cpu() {
            self.value_size.div_ceil(8) * 8 * self.per_cpu
        } else {
            self.value_size
        }
    }

    fn is_per_cpu(&self) -> bool {
        matches!(
            self.kind,
            MapType::PerCpuArray | MapType::PerCpuHash | MapType::LruPerCpuHash
        )
    }

    /// Whether the map is an array (every key `0..max_entries` exists).
    pub fn is_array(&self) -> bool {
        matches!(self.kind, MapType::Array | MapType::PerCpuArray)
    }

    /// The value of `key`, if it has one.
    pub fn get(&self, key: &[u8]) -> std::io::Result<Option<Vec<u8>>> {
        let mut value = vec![0u8; self.value_len()];
        let mut attr = ElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: key.as_ptr() as u64,
            value_or_next: value.as_mut_ptr() as u64,
            ..ElemAttr::default()
        };
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(_) => Ok(Some(value)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sets `key` to `value` (of [`RawMap::value_len`] bytes).
    pub fn set(&self, key: &[u8], value: &[u8]) -> std::io::Result<()> {
        assert_eq!(key.len(), self.key_size, "key size");
        assert_eq!(value.len(), self.value_len(), "value size");
        let mut attr = ElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: key.as_ptr() as u64,
            value_or_next: value.as_ptr() as u64,
            ..ElemAttr::default()
        };
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
    }

    /// Every key, in the kernel's order (arrays: `0..max_entries`).
    pub fn keys(&self) -> std::io::Result<Vec<Vec<u8>>> {
        if self.is_array() {
            return Ok((0..self.max_entries)
                .map(|i| i.to_ne_bytes().to_vec())
                .collect());
        }
        let mut keys = Vec::new();
        let mut next = vec![0u8; self.key_size];
        let mut prev: Option<Vec<u8>> = None;
        loop {
            let mut attr = ElemAttr {
                map_fd: self.fd.as_raw_fd() as u32,
                key: prev.as_ref().map_or(0, |k| k.as_ptr() as u64),
                value_or_next: next.as_mut_ptr() as u64,
                ..ElemAttr::default()
            };
            match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
                Ok(_) => {
                    keys.push(next.clone());
                    prev = Some(next.clone());
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
                Err(e) => return Err(e),
            }
        }
    }

    /// Every entry; for arrays only those whose value is not all zero (what
    /// an array holds without being written).
    pub fn entries(&self) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        for k in self.keys()? {
            if let Some(v) = self.get(&k)?
                && !(self.is_array() && v.iter().all(|b| *b == 0))
            {
                out.push((k, v));
            }
        }
        Ok(out)
    }
}
