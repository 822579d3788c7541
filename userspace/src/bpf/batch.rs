//! Bulk map writes shared by every stage: `BPF_MAP_UPDATE_BATCH` / `BPF_MAP_DELETE_BATCH` (one
//! syscall per chunk instead of one per entry: a firewall slot has 131,074 port entries and up to
//! millions of words; a Maglev table 65,537 positions), falling back to one update per entry on
//! kernels without batch support for a map type; and per-CPU counter sums.
use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    sync::atomic::{AtomicBool, Ordering},
};

use aya::{
    Pod,
    maps::{Array, IterableMap, MapData, MapError, PerCpuArray, PerCpuValues},
};
use rampart_common::Counter;

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("map {map}: {op}")]
    Map {
        map: &'static str,
        op: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {map}: {op}")]
    Sys {
        map: &'static str,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

type Result<T, E = BatchError> = std::result::Result<T, E>;

/// The sum over CPUs of a per-CPU counter.
pub fn sum(values: &PerCpuValues<Counter>) -> Counter {
    values.iter().fold(Counter::default(), |a, c| Counter {
        packets: a.packets.wrapping_add(c.packets),
        bytes: a.bytes.wrapping_add(c.bytes),
    })
}

pub const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
pub const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
pub const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// Entries per batch syscall: bounds the kernel's time in one call.
pub const BATCH_CHUNK: usize = 1 << 16;
/// Set once a batch command came back unsupported; later writes go entry by entry.
pub static NO_BATCH: AtomicBool = AtomicBool::new(false);

/// `union bpf_attr`, the part used by `BPF_MAP_*_BATCH`.
#[repr(C)]
#[derive(Default)]
pub struct BatchAttr {
    pub in_batch: u64,
    pub out_batch: u64,
    pub keys: u64,
    pub values: u64,
    pub count: u32,
    pub map_fd: u32,
    pub elem_flags: u64,
    pub flags: u64,
}

/// One batch syscall over `count` keys (and values). Ok, or the error and how many entries the
/// kernel had processed.
pub fn batch(
    cmd: libc::c_long,
    fd: BorrowedFd<'_>,
    keys: &[u8],
    values: Option<&[u8]>,
    count: usize,
) -> io::Result<()> {
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.map_or(0, |v| v.as_ptr() as u64),
        count: count as u32,
        map_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: `attr` points at buffers of `count` keys/values of the map's sizes, alive for the
    // call; the kernel reads only `size_of::<BatchAttr>()` bytes of `attr`.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, &mut attr as *mut BatchAttr, size_of::<BatchAttr>() as u32) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Errors meaning "this kernel has no batch operation for this map type".
pub fn unsupported(e: &io::Error) -> bool {
    // 524 = ENOTSUPP, the kernel-internal code some map types return.
    matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(524))
}

pub fn as_bytes<T: Pod>(v: &[T]) -> &[u8] {
    // SAFETY: Pod types are plain bytes without padding (rampart_common asserts their sizes).
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), size_of_val(v)) }
}

/// Tries the batch path; `Ok(false)` when the kernel lacks it (the caller goes entry by entry).
pub fn try_batch(
    map: &'static str,
    op: &'static str,
    cmd: libc::c_long,
    fd: BorrowedFd<'_>,
    keys: &[u8],
    key_size: usize,
    values: Option<(&[u8], usize)>,
) -> Result<bool> {
    if NO_BATCH.load(Ordering::Relaxed) {
        return Ok(false);
    }
    let n = keys.len() / key_size;
    let mut done = 0;
    while done < n {
        let k = BATCH_CHUNK.min(n - done);
        let ks = &keys[done * key_size..(done + k) * key_size];
        let vs = values.map(|(v, vsize)| &v[done * vsize..(done + k) * vsize]);
        match batch(cmd, fd, ks, vs, k) {
            Ok(()) => done += k,
            Err(e) if done == 0 && unsupported(&e) => {
                log::warn!("map {map}: batch operations unsupported ({e}); writing entry by entry");
                NO_BATCH.store(true, Ordering::Relaxed);
                return Ok(false);
            }
            Err(source) => return Err(BatchError::Sys { map, op, source }),
        }
    }
    Ok(true)
}

/// `map[first + i] = values[i]`.
pub fn write_array<V: Pod>(map: &mut Array<MapData, V>, name: &'static str, first: u32, values: &[V]) -> Result<()> {
    if values.is_empty() {
        return Ok(());
    }
    let keys: Vec<u32> = (first..first + values.len() as u32).collect();
    let fd = map.map().fd().as_fd();
    if try_batch(name, "write", BPF_MAP_UPDATE_BATCH, fd, as_bytes(&keys), 4, Some((as_bytes(values), size_of::<V>())))?
    {
        return Ok(());
    }
    for (k, v) in keys.iter().zip(values) {
        map.set(*k, v, 0).map_err(|source| BatchError::Map { map: name, op: "write", source })?;
    }
    Ok(())
}

/// Zeroes `n` per-CPU counters from `first`, on every CPU.
pub fn zero_counters<C: Pod + Default>(
    map: &mut PerCpuArray<MapData, C>,
    name: &'static str,
    first: u32,
    n: usize,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let cpus = aya::util::nr_cpus().map_err(|(_, source)| BatchError::Sys { map: name, op: "count CPUs", source })?;
    let keys: Vec<u32> = (first..first + n as u32).collect();
    // Per-CPU batch values: for each key, one value per possible CPU, each padded to 8 bytes.
    let stride = size_of::<C>().next_multiple_of(8) * cpus;
    let zeros = vec![0u8; stride * n];
    let fd = map.map().fd().as_fd();
    if try_batch(name, "zero counters", BPF_MAP_UPDATE_BATCH, fd, as_bytes(&keys), 4, Some((&zeros, stride)))? {
        return Ok(());
    }
    for k in keys {
        let v = PerCpuValues::try_from(vec![C::default(); cpus]).map_err(|source| BatchError::Sys {
            map: name,
            op: "zero counters",
            source,
        })?;
        map.set(k, v, 0).map_err(|source| BatchError::Map { map: name, op: "zero counters", source })?;
    }
    Ok(())
}
