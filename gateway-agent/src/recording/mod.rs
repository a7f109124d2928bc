//! Session recording (DESIGN §7). (Being written.)

pub mod cli;
