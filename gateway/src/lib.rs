//! The meshgate gateway: placeholder while the modules land.
pub mod synth;
