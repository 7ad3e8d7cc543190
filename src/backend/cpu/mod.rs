//! The CPU backend: reference for every kernel and the default that runs anywhere.
