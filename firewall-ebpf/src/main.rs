//! `rampart_fw`: the XDP program rampart attaches to a NIC.
//!
//! A packet's path: `parse::parse` (headers) → `firewall::classify` (rules) → counters →
//! verdict. Allowed packets are where the L4 balancer stage will run next (roadmap item 1).
#![no_std]
#![no_main]

mod firewall;
mod maps;
mod parse;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use rampart_common::{
    Counter,
    fw::stat,
};

use crate::{
    maps::{FW_RULE_STATS, FW_STATS},
    parse::{Frag, Parsed},
};

#[inline(always)]
fn count(map: &aya_ebpf::maps::PerCpuArray<Counter>, index: u32, bytes: u64) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot; XDP does not preempt itself on one CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

#[xdp]
pub fn rampart_fw(ctx: XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let pkt = match parse::parse(&ctx) {
        Parsed::NonIp => {
            count(&FW_STATS, stat::NON_IP, bytes);
            return xdp_action::XDP_PASS;
        }
        Parsed::Malformed(class) => {
            count(&FW_STATS, class, bytes);
            return xdp_action::XDP_DROP;
        }
        Parsed::Ip(pkt) => pkt,
    };
    match pkt.frag {
        Frag::Later => count(&FW_STATS, stat::FRAGMENT_LATER, bytes),
        Frag::First => count(&FW_STATS, stat::FRAGMENT_FIRST, bytes),
        Frag::None => {}
    }
    let Some(verdict) = firewall::classify(&pkt) else {
        return xdp_action::XDP_ABORTED;
    };
    let pass = verdict.action == xdp_action::XDP_PASS;
    let stat = match (verdict.rule, pass) {
        (Some(rule), pass) => {
            count(&FW_RULE_STATS, rule, bytes);
            if pass { stat::RULE_ALLOW } else { stat::RULE_DENY }
        }
        (None, true) => stat::DEFAULT_ALLOW,
        (None, false) => stat::DEFAULT_DENY,
    };
    count(&FW_STATS, stat, bytes);
    // Roadmap 1: the L4 balancer stage takes allowed packets here (`lb::balance(&ctx, &pkt)`).
    verdict.action
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
