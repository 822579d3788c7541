//! Shared helpers for rampart integration tests.
