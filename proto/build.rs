//! Generates the protocol types from `vane/v1/vane.proto` with protox, so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "vane/v1/vane.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["."])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
