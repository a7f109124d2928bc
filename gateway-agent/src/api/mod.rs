//! The REST API under `/api/v1` (approvals; sessions later), served over TLS. (Being
//! written.)

pub mod client;
