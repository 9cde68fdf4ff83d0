//! Integration tests of the broker: a real broker on 127.0.0.1:0, real websockets and HTTP,
//! and a fake worker speaking the worker protocol. One test binary, one module per area.

mod bad_input;
mod blobs;
mod common;
mod conformance;
mod jobs;
mod k8s;
mod ops;
mod recovery;
mod security;
