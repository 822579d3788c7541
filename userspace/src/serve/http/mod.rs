//! The HTTP reverse proxy: [`h1`] serves HTTP/1.1 clients and hyper serves h2 ones, both
//! deciding through [`proxy`] (routes, [`firewall`], backend picks); [`upstream`] speaks
//! HTTP/1.1 to backends over the connections [`backend`] opens and keeps, and [`tunnel`] joins
//! a client and a backend after a 101. The listeners, TLS, timers and metrics it runs on are
//! the daemon's shared parts in `serve/`.

pub mod backend;
pub mod firewall;
pub mod h1;
pub mod proxy;
pub mod tunnel;
pub mod upstream;

// The shared parts of the daemon the HTTP modules use, named here once so that their
// `use super::…` lines read the same as before the move into `http/`.
use super::{Shared, coarse_ms, metrics, proxy_protocol, runtime, stats, tcp, timer};
