//! Builds the XDP objects (`lb-ebpf`, for `bpfel-unknown-none`, with nightly
//! and bpf-linker) into OUT_DIR, where `dataplane` embeds them.
//! `cargo xtask setup` installs what this needs.

fn main() -> aya_build::Result<()> {
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf");
    let package = aya_build::Package {
        name: "lb-ebpf",
        root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
