//! Guest programs bt86 builds itself, with no external assembler: the multiboot test-kernel kit
//! ([`kit`]) and the nanobenchmark kernels `bt86 bench` runs on every engine ([`nano`]).

pub mod kit;
pub mod nano;
