//! Tollgate's node agent: one module per concern (DESIGN §1). The binary (`main.rs`) is
//! a thin CLI over these.
//!
//! - [`datapath`]: the eBPF programs: load, attach, pin, map sync, connection origins.
//! - [`doctor`]: can this node run the data path?

pub mod datapath;
pub mod doctor;
