//! Packet code shared by the XDP programs: bounds-checked access, header
//! parsing, checksums and next-hop lookups. No maps live here; each program binary owns its
//! maps, so an object only carries the maps it uses.
#![no_std]
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

pub mod csum;
pub mod fib;
pub mod packet;
pub mod parse;
