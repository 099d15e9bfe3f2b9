//! Kernel loaders: they place a guest kernel in guest memory and say how to enter it.

pub mod linux;
pub mod multiboot;
