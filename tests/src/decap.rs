//! Running `rampart_decap` on single frames with BPF_PROG_TEST_RUN: the action, the frame as
//! the program left it, and which `DECAP_STATS` counters moved. Every instance loads the object
//! on its own (no attach, no pins: everything goes when it is dropped).

use std::net::IpAddr;

use aya::{
    Ebpf,
    maps::{HashMap, MapData, MapError, PerCpuArray},
    programs::{ProgramError, TestRun, TestRunOptions, Xdp},
};
use rampart_common::{
    Counter,
    lb::{DECAP_PROGRAM_NAME, DECAP_STATS, DECAP_VIPS, DecapKey, decap_stat},
};

use crate::testrun::is_root;

#[derive(Debug, thiserror::Error)]
pub enum DecapRunError {
    #[error("BPF_PROG_TEST_RUN needs root (CAP_BPF and CAP_NET_ADMIN): run the packet tests as root")]
    NotRoot,
    #[error("loading the decap object (rampart::bpf::DECAP_OBJ)")]
    Load(#[source] aya::EbpfError),
    #[error("program {DECAP_PROGRAM_NAME}: {what}")]
    Program {
        what: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("program {DECAP_PROGRAM_NAME}: not in the object, or not XDP")]
    NoProgram,
    #[error("map {map}: {what}")]
    Map {
        map: &'static str,
        what: &'static str,
        #[source]
        source: MapError,
    },
    #[error("BPF_PROG_TEST_RUN on a {len}-byte frame")]
    Run {
        len: usize,
        #[source]
        source: ProgramError,
    },
}

type Result<T, E = DecapRunError> = std::result::Result<T, E>;

/// What one frame did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecapOutcome {
    pub action: u32,
    /// The frame after the program.
    pub out: Vec<u8>,
    /// Every `DECAP_STATS` index that moved, with its delta.
    pub stats: Vec<(u32, Counter)>,
}

pub struct DecapTestRun {
    ebpf: Ebpf,
    vips: HashMap<MapData, DecapKey, u32>,
    stats: PerCpuArray<MapData, Counter>,
    base: Vec<Counter>,
}

impl DecapTestRun {
    /// Loads `rampart::bpf::DECAP_OBJ` with `vips` in `DECAP_VIPS`.
    pub fn new(vips: &[IpAddr]) -> Result<Self> {
        if !is_root() {
            return Err(DecapRunError::NotRoot);
        }
        let mut ebpf = Ebpf::load(rampart::bpf::DECAP_OBJ).map_err(DecapRunError::Load)?;
        let map_err = |map, what| move |source| DecapRunError::Map { map, what, source };
        let mut vip_map: HashMap<MapData, DecapKey, u32> = ebpf
            .take_map(DECAP_VIPS)
            .ok_or(MapError::InvalidName { name: DECAP_VIPS.into() })
            .and_then(HashMap::try_from)
            .map_err(map_err(DECAP_VIPS, "open"))?;
        for v in vips {
            vip_map.insert(DecapKey::new(*v), 0, 0).map_err(map_err(DECAP_VIPS, "insert"))?;
        }
        let stats: PerCpuArray<MapData, Counter> = ebpf
            .take_map(DECAP_STATS)
            .ok_or(MapError::InvalidName { name: DECAP_STATS.into() })
            .and_then(PerCpuArray::try_from)
            .map_err(map_err(DECAP_STATS, "open"))?;
        let prog: &mut Xdp = ebpf
            .program_mut(DECAP_PROGRAM_NAME)
            .ok_or(DecapRunError::NoProgram)?
            .try_into()
            .map_err(|_| DecapRunError::NoProgram)?;
        prog.load().map_err(|source| DecapRunError::Program { what: "load (verifier)", source })?;
        let mut me = DecapTestRun { ebpf, vips: vip_map, stats, base: Vec::new() };
        me.base = me.read_stats()?;
        Ok(me)
    }

    /// The loaded program (for its info: maps, instructions).
    pub fn prog(&self) -> Result<&Xdp> {
        self.ebpf
            .program(DECAP_PROGRAM_NAME)
            .ok_or(DecapRunError::NoProgram)?
            .try_into()
            .map_err(|_| DecapRunError::NoProgram)
    }

    pub fn remove_vip(&mut self, vip: IpAddr) -> Result<()> {
        self.vips.remove(&DecapKey::new(vip)).map_err(|source| DecapRunError::Map {
            map: DECAP_VIPS,
            what: "remove",
            source,
        })
    }

    /// `DECAP_STATS` summed over CPUs, by index.
    pub fn read_stats(&self) -> Result<Vec<Counter>> {
        (0..decap_stat::COUNT)
            .map(|i| {
                let v = self.stats.get(&i, 0).map_err(|source| DecapRunError::Map {
                    map: DECAP_STATS,
                    what: "read",
                    source,
                })?;
                Ok(v.iter().fold(Counter::default(), |a, c| Counter {
                    packets: a.packets.wrapping_add(c.packets),
                    bytes: a.bytes.wrapping_add(c.bytes),
                }))
            })
            .collect()
    }

    /// Runs `frame` once.
    pub fn run(&mut self, frame: &[u8]) -> Result<DecapOutcome> {
        let mut out = vec![0u8; frame.len() + 256];
        let res = {
            let opts = TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..Default::default() };
            self.prog()?.test_run(opts).map_err(|source| DecapRunError::Run { len: frame.len(), source })?
        };
        out.truncate(res.data_size_out as usize);
        let now = self.read_stats()?;
        let stats = now
            .iter()
            .zip(&self.base)
            .enumerate()
            .filter(|(_, (n, b))| n != b)
            .map(|(i, (n, b))| {
                (i as u32, Counter { packets: n.packets.wrapping_sub(b.packets), bytes: n.bytes.wrapping_sub(b.bytes) })
            })
            .collect();
        self.base = now;
        Ok(DecapOutcome { action: res.return_value, out, stats })
    }
}
