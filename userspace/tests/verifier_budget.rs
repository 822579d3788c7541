//! The kernel verifier walks every path of `rampart_fw` at load time and refuses programs over
//! 1,000,000 processed instructions; every branch in the parser or the candidate loop multiplies
//! the paths it walks. This test keeps the program under a budget so that growth is noticed.

use aya::{Ebpf, programs::Xdp};
use rampart::bpf::FIREWALL_OBJ;
use rampart_common::fw::PROGRAM_NAME;

/// A regression guard, about 1.35 times today's ~224,000: the firewall ~95,000 (the candidate
/// loop in `fw/mod.rs` ~60,000 of it, walked once; the keyed path ~17,000, its two port ranges
/// each way branching in each of 8 iterations, which is still cheaper than branch-free compares
/// (~376,000: they defeat state pruning); the IPv6 extension-header walk, a global function,
/// ~9,500) and the balancer's global functions (`lb/mod.rs`) ~129,000, each checked once on its
/// own. Going over means some path now reaches the candidate loop in a state of its own (see the
/// notes in `parse.rs` and `fw/mod.rs`), or a balancer function grew a branch per path.
const BUDGET: u32 = 300_000;

#[test]
fn firewall_program_stays_within_the_verifier_budget() {
    assert!(unsafe { libc::geteuid() } == 0, "this test loads a BPF program and needs root");
    let mut ebpf = Ebpf::load(FIREWALL_OBJ).expect("parse the embedded object");
    let prog: &mut Xdp = ebpf.program_mut(PROGRAM_NAME).expect("program in object").try_into().expect("an XDP program");
    prog.load().expect("the verifier accepts rampart_fw");
    let insns = prog.info().expect("program info").verified_instruction_count().expect("the kernel reports verified_insns (5.16+)");
    println!("rampart_fw: {insns} instructions processed by the verifier (budget {BUDGET})");
    assert!(insns <= BUDGET, "rampart_fw needs {insns} verifier instructions, over the budget of {BUDGET}");
}
