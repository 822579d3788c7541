//! Typed handles on the balancer's maps (`rampart_common::lb`) and the writes [`super::state`]
//! makes: services, backends, Maglev positions (whole tables or deltas), counters.
//!
//! [`LbTables`] is taken from a freshly loaded pipeline object ([`LbTables::from_ebpf`]) or
//! reopened from its pins ([`LbTables::from_pins`]), as the firewall's `FwTables`.
use std::path::{Path, PathBuf};

use aya::{
    Ebpf,
    maps::{Array, HashMap, IterableMap, Map, MapData, MapError, PerCpuArray, PerCpuValues},
};
use rampart_common::{
    Counter,
    lb::{BackendInfo, LbConfig, LbCounter, VipInfo, VipKey, map_names as names, stat},
};

use crate::bpf::batch::{BatchError, sum, write_array, zero_counters};

#[derive(Debug, thiserror::Error)]
pub enum LbTablesError {
    #[error("map {map}: not in the program object")]
    Missing { map: &'static str },
    #[error("map {map}: open pin {}", path.display())]
    FromPin {
        map: &'static str,
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("map {map}: pin at {}", path.display())]
    Pin {
        map: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("map {map}: {op}")]
    Map {
        map: &'static str,
        op: &'static str,
        #[source]
        source: MapError,
    },
    #[error(transparent)]
    Batch(#[from] BatchError),
}

type Result<T, E = LbTablesError> = std::result::Result<T, E>;

/// Typed handles on every map of the balancer stage.
pub struct LbTables {
    config: Array<MapData, LbConfig>,
    vips: HashMap<MapData, VipKey, VipInfo>,
    backends: Array<MapData, BackendInfo>,
    ring: Array<MapData, u32>,
    /// Not written by userspace (the program fills them); held so they are pinned and unpinned
    /// with the others.
    conntrack: Map,
    conntrack6: Map,
    nexthops: Map,
    service_stats: PerCpuArray<MapData, LbCounter>,
    backend_stats: PerCpuArray<MapData, LbCounter>,
    stats: PerCpuArray<MapData, Counter>,
    ports: Array<MapData, u64>,
}

fn typed<T: TryFrom<Map, Error = MapError>>(map: &'static str, m: Map) -> Result<T> {
    T::try_from(m).map_err(|source| LbTablesError::Map { map, op: "check key/value types", source })
}

fn sum_lb(values: &PerCpuValues<LbCounter>) -> LbCounter {
    values.iter().fold(LbCounter::default(), |a, c| LbCounter {
        packets: a.packets.wrapping_add(c.packets),
        bytes: a.bytes.wrapping_add(c.bytes),
        new_flows: a.new_flows.wrapping_add(c.new_flows),
        _pad: 0,
    })
}

impl LbTables {
    /// Takes the balancer's maps out of a loaded object.
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self> {
        Self::build(|name| ebpf.take_map(name).ok_or(LbTablesError::Missing { map: name }))
    }

    /// Reopens the maps pinned in `dir`.
    pub fn from_pins(dir: &Path) -> Result<Self> {
        Self::build(|name| {
            let path = dir.join(name);
            let data = MapData::from_pin(&path).map_err(|source| LbTablesError::FromPin {
                map: name,
                path: path.clone(),
                source,
            })?;
            Map::from_map_data(data).map_err(|source| LbTablesError::FromPin { map: name, path, source })
        })
    }

    fn build(mut get: impl FnMut(&'static str) -> Result<Map>) -> Result<Self> {
        Ok(LbTables {
            config: typed(names::CONFIG, get(names::CONFIG)?)?,
            vips: typed(names::VIPS, get(names::VIPS)?)?,
            backends: typed(names::BACKENDS, get(names::BACKENDS)?)?,
            ring: typed(names::RING, get(names::RING)?)?,
            conntrack: get(names::CONNTRACK)?,
            conntrack6: get(names::CONNTRACK6)?,
            nexthops: get(names::NEXTHOPS)?,
            service_stats: typed(names::SERVICE_STATS, get(names::SERVICE_STATS)?)?,
            backend_stats: typed(names::BACKEND_STATS, get(names::BACKEND_STATS)?)?,
            stats: typed(names::STATS, get(names::STATS)?)?,
            ports: typed(names::PORTS, get(names::PORTS)?)?,
        })
    }

    /// Pins every map in `dir` under its name.
    pub fn pin_all(&self, dir: &Path) -> Result<()> {
        let pin = |name: &'static str, data: &MapData| {
            let path = dir.join(name);
            data.pin(&path).map_err(|source| LbTablesError::Pin { map: name, path, source })
        };
        pin(names::CONFIG, self.config.map())?;
        pin(names::VIPS, self.vips.map())?;
        pin(names::BACKENDS, self.backends.map())?;
        pin(names::RING, self.ring.map())?;
        for (name, map) in [
            (names::CONNTRACK, &self.conntrack),
            (names::CONNTRACK6, &self.conntrack6),
            (names::NEXTHOPS, &self.nexthops),
        ] {
            let path = dir.join(name);
            map.pin(&path).map_err(|source| LbTablesError::Pin { map: name, path, source })?;
        }
        pin(names::SERVICE_STATS, self.service_stats.map())?;
        pin(names::BACKEND_STATS, self.backend_stats.map())?;
        pin(names::STATS, self.stats.map())?;
        pin(names::PORTS, self.ports.map())
    }

    /// Writes the bitmap of ports some service uses (`rampart_common::lb::PORT_WORDS` words).
    pub fn write_ports(&mut self, words: &[u64]) -> Result<()> {
        Ok(write_array(&mut self.ports, names::PORTS, 0, words)?)
    }

    pub fn config(&self) -> Result<LbConfig> {
        self.config.get(&0, 0).map_err(|source| LbTablesError::Map { map: names::CONFIG, op: "read", source })
    }

    pub fn set_config(&mut self, c: &LbConfig) -> Result<()> {
        self.config.set(0, c, 0).map_err(|source| LbTablesError::Map { map: names::CONFIG, op: "write", source })
    }

    /// Makes `key` a service (or updates it).
    pub fn set_vip(&mut self, key: &VipKey, info: &VipInfo) -> Result<()> {
        self.vips.insert(key, info, 0).map_err(|source| LbTablesError::Map { map: names::VIPS, op: "write", source })
    }

    pub fn delete_vip(&mut self, key: &VipKey) -> Result<()> {
        match self.vips.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(LbTablesError::Map { map: names::VIPS, op: "delete", source }),
        }
    }

    pub fn set_backend(&mut self, id: u32, b: &BackendInfo) -> Result<()> {
        self.backends.set(id, b, 0).map_err(|source| LbTablesError::Map { map: names::BACKENDS, op: "write", source })
    }

    pub fn backend(&self, id: u32) -> Result<BackendInfo> {
        self.backends.get(&id, 0).map_err(|source| LbTablesError::Map { map: names::BACKENDS, op: "read", source })
    }

    /// Writes a whole table at `base` (a new service): one batch.
    pub fn write_ring(&mut self, base: u32, table: &[u32]) -> Result<()> {
        Ok(write_array(&mut self.ring, names::RING, base, table)?)
    }

    /// Writes the positions that changed (Maglev deltas), each with one update: a packet reads
    /// one position, so it sees the old backend or the new one.
    pub fn write_ring_deltas(&mut self, base: u32, deltas: &[(u32, u32)]) -> Result<()> {
        for &(pos, id) in deltas {
            self.ring.set(base + pos, id, 0).map_err(|source| LbTablesError::Map {
                map: names::RING,
                op: "write",
                source,
            })?;
        }
        Ok(())
    }

    /// The table of the service at `base`, as the kernel holds it.
    pub fn ring(&self, base: u32, size: u32) -> Result<Vec<u32>> {
        (base..base + size)
            .map(|i| self.ring.get(&i, 0).map_err(|source| LbTablesError::Map { map: names::RING, op: "read", source }))
            .collect()
    }

    /// Zeroes the counters of a service index that is being (re)used.
    pub fn zero_service_counters(&mut self, index: u32) -> Result<()> {
        Ok(zero_counters(&mut self.service_stats, names::SERVICE_STATS, index, 1)?)
    }

    /// Zeroes the counters of a backend id that is being (re)used.
    pub fn zero_backend_counters(&mut self, id: u32) -> Result<()> {
        Ok(zero_counters(&mut self.backend_stats, names::BACKEND_STATS, id, 1)?)
    }

    pub fn service_counters(&self, index: u32) -> Result<LbCounter> {
        self.service_stats.get(&index, 0).map(|v| sum_lb(&v)).map_err(|source| LbTablesError::Map {
            map: names::SERVICE_STATS,
            op: "read",
            source,
        })
    }

    pub fn backend_counters(&self, id: u32) -> Result<LbCounter> {
        self.backend_stats.get(&id, 0).map(|v| sum_lb(&v)).map_err(|source| LbTablesError::Map {
            map: names::BACKEND_STATS,
            op: "read",
            source,
        })
    }

    /// The stage's event counters, by `rampart_common::lb::stat` index.
    pub fn stats(&self) -> Result<Vec<Counter>> {
        (0..stat::NAMES.len() as u32)
            .map(|i| {
                self.stats.get(&i, 0).map(|v| sum(&v)).map_err(|source| LbTablesError::Map {
                    map: names::STATS,
                    op: "read",
                    source,
                })
            })
            .collect()
    }
}
