//! Code generation settings for the BPF objects, passed to bpf-linker (which
//! does the final LLVM code generation).
//!
//! - `--disable-expand-memcpy-in-order`: that mode keeps memcpy as ordered
//!   load/store pairs for JIT pattern matching, and as a side effect turns
//!   every `memset` (a zeroed struct, say) into a call to a byte loop.
//!   Without it LLVM inlines small memsets and memcpys as word stores.

fn main() {
    println!("cargo::rustc-link-arg-bins=--disable-expand-memcpy-in-order");
}
