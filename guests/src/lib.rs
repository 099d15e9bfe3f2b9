//! Guest programs bt86 builds itself, with no external assembler: the multiboot test-kernel kit
//! ([`kit`]), the nanobenchmark kernels `bt86 bench` runs on every engine ([`nano`]), and the
//! linux benchmark's disk program ([`diskio`]).

pub mod diskio;
pub mod kit;
pub mod nano;
