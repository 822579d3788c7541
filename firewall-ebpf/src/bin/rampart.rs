//! `rampart_fw`: the XDP program rampart attaches to a NIC. A packet's whole path reads top to
//! bottom here, one call per stage: `parse` (headers) → `fw::classify` (rules, counters) →
//! `lb::balance` (services: to a backend, encapsulated) → verdict.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use firewall_ebpf::{
    count,
    fw::{
        self,
        maps::{FW_RULE_STATS, FW_STATS},
    },
    lb,
    parse::{self, Frag, Parsed},
};
use rampart_common::fw::stat;

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
    let Some(verdict) = fw::classify(&pkt) else {
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
    if !pass {
        return verdict.action;
    }
    // Allowed: a packet addressed to a service goes to a backend; any other goes on.
    lb::balance(&ctx, &pkt).unwrap_or(verdict.action)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
