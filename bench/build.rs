//! Builds the etcd client from `proto/etcd.proto` with protox, so no system `protoc` is needed
//! (the same way `flock-proto` builds flock's own protocol).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/etcd.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    // Only the client is needed: the server side is the real etcd.
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
