//! The L4 balancer's userspace side; [`decap`]: the backends' decapsulation program.
pub mod decap;
