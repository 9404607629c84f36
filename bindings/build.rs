//! Link the Linux/Android shared library with packed relative relocations (DT_RELR): the
//! dynamic relocations of a position-independent library shrink from ~470 KB to a few KB.
//! Supported by binutils >= 2.38 and Android >= 9 (API 28); Apple targets link the static library.

fn main() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os == "linux" || os == "android" {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-z,pack-relative-relocs");
    }
}
