#![no_std]
// The kernel crate's modules live in the binaries (see main.rs); this file exists so the package
// has a library target, as aya's template does.
